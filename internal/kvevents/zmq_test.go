package kvevents

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

type rec struct {
	mu     sync.Mutex
	seqs   []uint64
	lost   []string
	bad    int
	notify chan struct{}
}

func newRec() *rec { return &rec{notify: make(chan struct{}, 1000)} }

func (r *rec) Batch(seq uint64, _ Batch) {
	r.mu.Lock()
	r.seqs = append(r.seqs, seq)
	r.mu.Unlock()
	r.notify <- struct{}{}
}
func (r *rec) Lost(seq uint64, restarted bool) {
	r.mu.Lock()
	r.lost = append(r.lost, fmt.Sprintf("%d/%v", seq, restarted))
	r.mu.Unlock()
}
func (r *rec) Bad(error) { r.mu.Lock(); r.bad++; r.mu.Unlock() }

// wait blocks until n batches have arrived.
func (r *rec) wait(t *testing.T, n int) []uint64 {
	t.Helper()
	for {
		r.mu.Lock()
		got := append([]uint64(nil), r.seqs...)
		r.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-r.notify:
		case <-time.After(10 * time.Second):
			t.Fatalf("got %v, want %d batches", got, n)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// publishUntilHeard sends batches until the subscriber has heard one of
// them (a SUB joins a PUB asynchronously: what is sent before is dropped, as
// with libzmq), then returns how many were sent. Heard means a batch more
// than the recorder held when it began: a wake-up left in r.notify by an
// earlier batch says nothing about this publisher (taking one for an answer
// stopped the sends before a restarted engine's subscriber had joined).
func publishUntilHeard(t *testing.T, p *Publisher, r *rec) uint64 {
	t.Helper()
	r.mu.Lock()
	before := len(r.seqs)
	r.mu.Unlock()
	heard := func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return len(r.seqs) > before
	}
	sent := uint64(0)
	// Bounded by time, not by sends: on a loaded machine a (re)dial can
	// take seconds, and each wait below can take far longer than 20 ms.
	deadline := time.Now().Add(45 * time.Second)
	for {
		p.Publish(sample())
		sent++
		select {
		case <-r.notify:
		case <-time.After(20 * time.Millisecond):
		}
		if heard() {
			return sent
		}
		if !time.Now().Before(deadline) {
			p.mu.Lock()
			connected := p.pub != nil
			p.mu.Unlock()
			if os.Getenv("KV_DUMP") != "" {
				_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
			}
			t.Fatalf("the subscriber never heard the publisher (%d batches in 45 s; publisher connected: %v)", sent, connected)
		}
	}
}

func TestPubSubBothWaysWithReplay(t *testing.T) {
	for _, engineBinds := range []bool{true, false} {
		t.Run(fmt.Sprint("engine binds ", engineBinds), func(t *testing.T) {
			port, rport := freePort(t), freePort(t)
			ep := fmt.Sprintf("tcp://127.0.0.1:%d", port)
			if engineBinds {
				ep = fmt.Sprintf("tcp://*:%d", port)
			}
			replay := fmt.Sprintf("tcp://127.0.0.1:%d", rport)
			ctx, cancel := context.WithCancel(context.Background())
			r := newRec()
			s := &Subscriber{Endpoint: ep, Replay: replay, Topic: "kv-events"}
			done := make(chan error, 1)
			go func() { done <- s.Run(ctx, r) }()
			p, err := NewPublisher(ep, replay, "kv-events", 5000, 0) // room to replay everything publishUntilHeard may send
			require.NoError(t, err)
			sent := publishUntilHeard(t, p, r)
			// The subscriber joined late: the replay buffer had everything
			// from 0, so it heard every batch in order.
			got := r.wait(t, int(sent))
			for i, s := range got {
				require.Equal(t, uint64(i), s)
			}
			// A dropped batch (the PUB's high-water mark) is replayed.
			p.drop = 1
			p.Publish(sample())
			p.drop = 0
			p.Publish(sample())
			got = r.wait(t, int(sent)+2)
			require.Equal(t, []uint64{sent, sent + 1}, got[sent:])
			r.mu.Lock()
			require.Empty(t, r.lost)
			r.mu.Unlock()
			// The subscriber is stopped first: an engine that goes away
			// under a dialing subscriber is a broken connection, which Run
			// returns (the agent's loop dials again), not a clean stop.
			cancel()
			require.NoError(t, <-done)
			p.Close()
		})
	}
}

func TestSubscriberSeesRestartAndUnreplayableGap(t *testing.T) {
	port := freePort(t)
	ep := fmt.Sprintf("tcp://127.0.0.1:%d", port)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := newRec()
	s := &Subscriber{Endpoint: ep, Topic: ""} // no replay socket
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, r) }()
	p, err := NewPublisher(ep, "", "", 10, 0)
	require.NoError(t, err)
	sent := publishUntilHeard(t, p, r)
	r.wait(t, 1)
	p.drop = 1
	p.Publish(sample())
	p.drop = 0
	p.Publish(sample())
	r.wait(t, 2)
	p.Close()
	// The engine restarts: its numbering begins again.
	p, err = NewPublisher(ep, "", "", 10, 0)
	require.NoError(t, err)
	defer p.Close()
	publishUntilHeard(t, p, r)
	r.wait(t, 3)
	r.mu.Lock()
	lost := append([]string(nil), r.lost...)
	r.mu.Unlock()
	if sent > 1 {
		require.Equal(t, fmt.Sprintf("%d/false", sent-1), lost[0], "joined late, nothing to replay from")
		lost = lost[1:]
	}
	require.Equal(t, fmt.Sprintf("%d/false", sent+1), lost[0], "the dropped batch is gone")
	require.Contains(t, lost[1], "/true", "the restart")
	cancel()
	require.NoError(t, <-done)
}

// TestPublisherRedialsARestartedSubscriber: the head's agent restarts while
// the engine runs. The engine (connecting, as shoal sets it up) dials again,
// as libzmq does, and the new subscriber, joining late, replays what it
// missed.
func TestPublisherRedialsARestartedSubscriber(t *testing.T) {
	port, rport := freePort(t), freePort(t)
	ep, replay := fmt.Sprintf("tcp://127.0.0.1:%d", port), fmt.Sprintf("tcp://127.0.0.1:%d", rport)
	p, err := NewPublisher(ep, replay, "t", 5000, 0)
	require.NoError(t, err)
	defer p.Close()
	total := 0
	for round := 0; round < 2; round++ {
		ctx, cancel := context.WithCancel(context.Background())
		r := newRec()
		s := &Subscriber{Endpoint: ep, Replay: replay, Topic: "t"}
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx, r) }()
		total += int(publishUntilHeard(t, p, r))
		got := r.wait(t, total)
		for i, seq := range got {
			require.Equal(t, uint64(i), seq, "round %d: every batch since the engine started, in order", round)
		}
		r.mu.Lock()
		require.Empty(t, r.lost, "round %d", round)
		r.mu.Unlock()
		cancel()
		require.NoError(t, <-done)
	}
}
