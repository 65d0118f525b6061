package router

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/stretchr/testify/require"
)

// withEvents marks every endpoint as sending KV events (an empty cache).
func withEvents(t *testing.T, kv *KVIndex, es []*Endpoint) {
	for _, e := range es {
		kv.Reset(e.Addr, vllmHasher(t), nil, 0)
	}
}

// ids are n distinct token ids starting at from.
func ids(from, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(from + i)
	}
	return out
}

// TestPrefixCostHolds: the decision to hold a request, as a table. It holds
// only a prompt every replica's KV events call a miss, only while every
// replica has the hold level of prefill queued (or others wait ahead), and
// only for a caller that can hold it.
func TestPrefixCostHolds(t *testing.T) {
	const hold = 4096
	for _, c := range []struct {
		name    string
		queued  []int // per replica
		others  []int // per replica: other routers' queues, as the heads report them
		noWait  bool  // the caller cannot hold
		cached  bool  // replica 1 holds the prompt
		history bool  // no KV events: the router's estimate
		behind  bool
		off     bool // --hold-prefill-tokens -1
		wait    bool
	}{
		{name: "every queue at the level", queued: []int{hold, hold, 5000}, wait: true},
		{name: "one queue below it", queued: []int{hold, hold - 1, 9000}},
		{name: "idle", queued: []int{0, 0, 0}},
		{name: "others wait ahead, room or not", queued: []int{0, 0, 0}, behind: true, wait: true},
		{name: "a cached prompt goes to its cache", queued: []int{hold, hold, hold}, cached: true},
		{name: "without KV events misses are guesses", queued: []int{hold, hold, hold}, history: true},
		{name: "a caller that cannot hold", queued: []int{hold, hold, hold}, noWait: true},
		{name: "holding turned off", queued: []int{hold, hold, hold}, off: true},
		{name: "other routers' queues count", queued: []int{hold / 2, hold / 2, 0}, others: []int{hold / 2, hold / 2, hold}, wait: true},
		{name: "room beside other routers' queues", queued: []int{hold / 2, hold / 2, 0}, others: []int{hold / 2, hold / 2, hold - 1}},
	} {
		t.Run(c.name, func(t *testing.T) {
			kv := NewKVIndex(0)
			q := NewQueues()
			p := newPickerWith(time.Now, 1, kv, q)
			p.holdTokens = hold
			if c.off {
				p.holdTokens = 0
			}
			es := eps(3, nil)
			h := hint{model: "m", tokens: ids(1, 100), promptTokens: 100, mayWait: !c.noWait, behind: c.behind}
			if c.history {
				h.tokens = nil
			} else {
				withEvents(t, kv, es)
			}
			if c.cached {
				kv.Reset(es[1].Addr, vllmHasher(t), vllmHasher(t).Keys(h.tokens, ""), 0)
			}
			for i, n := range c.queued {
				p.pending[es[i].Addr] = n
			}
			others := map[string]int64{}
			for i, n := range c.others {
				others[es[i].Addr] = int64(n)
			}
			q.SetOthers([]string{es[0].Addr, es[1].Addr, es[2].Addr}, others, 0)
			e := p.prefixCost(es, h)
			require.Equal(t, c.wait, e == nil, "picked %v", e)
			if c.cached {
				require.Equal(t, es[1].Addr, e.Addr)
			}
		})
	}
}

// holdingPicker is a picker holding at hold tokens over one replica that
// sends KV events (an empty cache).
func holdingPicker(t *testing.T, hold int) (*picker, *KVIndex, []*Endpoint) {
	kv := NewKVIndex(0)
	p := newPickerWith(time.Now, 1, kv, nil)
	p.holdTokens = hold
	es := eps(1, nil)
	withEvents(t, kv, es)
	return p, kv, es
}

// TestWaitersFirstComeFirstServed: requests that must wait queue in arrival
// order; a first token wakes only the first, which on picking wakes the
// next; one that gives up leaves its place (waking the next if it was first).
func TestWaitersFirstComeFirstServed(t *testing.T) {
	p, _, es := holdingPicker(t, 1000)
	h := func(n int) hint { return hint{model: "m", tokens: ids(n*10_000, 1000), promptTokens: 1000} }

	e, _, first, w, _ := p.pickOrQueue(StrategyPrefixCache, es, h(0), nil, nil)
	require.NotNil(t, e, "room: no wait")
	require.Nil(t, w)
	var ws []*waiter
	for i := 1; i <= 3; i++ {
		e, _, _, w, front := p.pickOrQueue(StrategyPrefixCache, es, h(i), nil, nil)
		require.Nil(t, e, "request %d: the only replica has 1,000 queued", i)
		require.Equal(t, i == 1, front, "request %d", i)
		ws = append(ws, w)
	}
	require.Equal(t, 3, p.waitingNow())
	woken := func() []bool {
		out := make([]bool, len(ws))
		for i, w := range ws {
			select {
			case <-w.wake:
				out[i] = true
			default:
			}
		}
		return out
	}
	require.Equal(t, []bool{false, false, false}, woken())

	first.firstToken()
	require.Equal(t, []bool{true, false, false}, woken(), "only the first is told")
	// The second asks before the first: it stays behind, room or not.
	e, _, _, again, front := p.pickOrQueue(StrategyPrefixCache, es, h(2), nil, ws[1])
	require.Nil(t, e)
	require.False(t, front)
	require.Same(t, ws[1], again)
	e, _, l1, w, _ := p.pickOrQueue(StrategyPrefixCache, es, h(1), nil, ws[0])
	require.NotNil(t, e)
	require.Nil(t, w)
	require.Equal(t, []bool{false, true, false}, woken(), "the first picked: the next is told")

	p.leave(ws[1]) // the second gives up while first: the third is told
	require.Equal(t, []bool{false, false, true}, woken())
	require.Equal(t, 1, p.waitingNow())
	p.leave(ws[1]) // twice: nothing
	l1.release()
	e, _, l3, w, _ := p.pickOrQueue(StrategyPrefixCache, es, h(3), nil, ws[2])
	require.NotNil(t, e)
	require.Nil(t, w)
	require.Equal(t, 0, p.waitingNow())
	l3.release()
}

// heldEngine is an engine whose answers wait: each request's prompt is
// reported on got, and its answer starts when a value arrives on start.
// stop ends every wait (a failed test must not hang in its cleanups: call
// it from a cleanup registered after the servers in front of it).
func heldEngine(t *testing.T) (srv *httptest.Server, got chan string, start chan struct{}, stop func()) {
	got, start = make(chan string, 16), make(chan struct{}, 16)
	done := make(chan struct{})
	var once sync.Once
	stop = func() { once.Do(func() { close(done) }) }
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- string(b)
		select {
		case <-start:
		case <-r.Context().Done():
			return
		case <-done:
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "data: {\"choices\":[{\"text\":\"x\"}]}\n\n")
		w.(http.Flusher).Flush()
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(stop)
	return srv, got, start, stop
}

// prompt is a completions body of n token ids from `from` (already tokens:
// no /tokenize call).
func prompt(from, n int) string {
	var sb strings.Builder
	for i, id := range ids(from, n) {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprint(&sb, id)
	}
	return `{"model":"m","stream":true,"prompt":[` + sb.String() + `]}`
}

// TestRouterHoldsUncachedPromptsForRoom: through the router's HTTP front,
// with a replica that already has 5,000 prefill tokens of this router's
// queued, a second uncached prompt waits at the router (it is not sent)
// until the first's first token, then goes; one whose client leaves while
// it waits is never sent; past --hold-prefill-max a request is sent anyway.
func TestRouterHoldsUncachedPromptsForRoom(t *testing.T) {
	eng, got, start, stop := heldEngine(t)
	r, front := holdingRouter(t, addr(eng), time.Hour)
	t.Cleanup(stop)
	send := func(ctx context.Context, body string) chan int { return sendPrefixCache(ctx, front, body) }
	waiting := func(n int) {
		require.Eventually(t, func() bool { return r.picker.waitingNow() == n && testutil.ToFloat64(r.waiting) == float64(n) },
			5*time.Second, time.Millisecond, "want %d waiting", n)
	}

	a := send(context.Background(), prompt(1, 5000))
	require.Contains(t, recv(t, got), `"prompt":[1,2,3`)
	b := send(context.Background(), prompt(100_000, 100))
	waiting(1)
	require.Empty(t, got, "the second prompt is held at the router, not queued at the engine")

	start <- struct{}{} // the first prompt's first token
	require.Contains(t, recv(t, got), `"prompt":[100000,`, "room: the held prompt goes")
	require.Equal(t, 200, <-a)
	waiting(0)
	start <- struct{}{}
	require.Equal(t, 200, <-b)
	require.Equal(t, uint64(1), histCount(t, r, "picked"))

	// A client that leaves while its request waits: never sent.
	a = send(context.Background(), prompt(1, 5000))
	recv(t, got)
	ctx, cancel := context.WithCancel(context.Background())
	c := send(ctx, prompt(200_000, 100))
	waiting(1)
	cancel()
	require.Equal(t, 0, <-c)
	waiting(0)
	require.Eventually(t, func() bool { return histCount(t, r, "canceled") == 1 }, 5*time.Second, time.Millisecond)
	require.Empty(t, got)
	start <- struct{}{}
	require.Equal(t, 200, <-a)

	// Past the longest wait a request is routed as if there were room.
	r, front = holdingRouter(t, addr(eng), 50*time.Millisecond)
	t.Cleanup(stop)
	a = send(context.Background(), prompt(1, 5000))
	recv(t, got)
	d := send(context.Background(), prompt(300_000, 100))
	require.Contains(t, recv(t, got), `"prompt":[300000,`)
	require.Equal(t, uint64(1), histCount(t, r, "timeout"))
	start <- struct{}{}
	start <- struct{}{}
	require.Equal(t, 200, <-a)
	require.Equal(t, 200, <-d)
}

// holdingRouter is a router with KV events from the engine at addr (an
// empty cache) that holds requests at most maxWait, behind an HTTP front.
func holdingRouter(t *testing.T, addr string, maxWait time.Duration) (*Router, *httptest.Server) {
	kv := NewKVIndex(0)
	ep := &Endpoint{Model: "m", Addr: addr, Group: "g"}
	withEvents(t, kv, []*Endpoint{ep})
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{ep}))
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{KV: kv, HoldPrefillMax: maxWait})
	front := httptest.NewServer(r.Handler())
	t.Cleanup(front.Close)
	return r, front
}

// sendPrefixCache posts a completion with the prefix-cache strategy to
// front; the status code (0: no answer) arrives on the channel.
func sendPrefixCache(ctx context.Context, front *httptest.Server, body string) chan int {
	code := make(chan int, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "POST", front.URL+"/v1/completions", strings.NewReader(body))
		req.Header.Set("Routing-Strategy", StrategyPrefixCache)
		resp, err := front.Client().Do(req)
		if err != nil {
			code <- 0
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		code <- resp.StatusCode
	}()
	return code
}

// recv is the next prompt the engine got, or a failure after 10 s.
func recv(t *testing.T, got chan string) string {
	t.Helper()
	select {
	case s := <-got:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("the engine got no request")
		return ""
	}
}

// histCount is how many waits ended with outcome.
func histCount(t *testing.T, r *Router, outcome string) uint64 {
	mfs, err := r.cfg.Registry.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != "shoal_router_wait_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return 0
}

// TestWaitingRequestTakesANewReplica: a request waiting for room goes to a
// replica the routing table gains (a scale-out) as soon as it appears, not
// after the next first token.
func TestWaitingRequestTakesANewReplica(t *testing.T) {
	eng1, got1, start1, stop1 := heldEngine(t)
	eng2, got2, start2, stop2 := heldEngine(t)
	kv := NewKVIndex(0)
	ep1 := &Endpoint{Model: "m", Addr: addr(eng1), Group: "g1"}
	ep2 := &Endpoint{Model: "m", Addr: addr(eng2), Group: "g2"}
	withEvents(t, kv, []*Endpoint{ep1, ep2})
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{ep1}))
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{KV: kv, HoldPrefillMax: time.Hour})
	front := httptest.NewServer(r.Handler())
	t.Cleanup(front.Close)
	t.Cleanup(stop1)
	t.Cleanup(stop2)
	send := func(body string) chan int { return sendPrefixCache(context.Background(), front, body) }
	a := send(prompt(1, 5000))
	recv(t, got1)
	b := send(prompt(100_000, 100))
	require.Eventually(t, func() bool { return r.picker.waitingNow() == 1 }, 5*time.Second, time.Millisecond)
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{ep1, ep2}))
	require.Contains(t, recv(t, got2), `"prompt":[100000,`, "the new replica takes the waiting request")
	require.Empty(t, got1)
	start1 <- struct{}{}
	start2 <- struct{}{}
	require.Equal(t, 200, <-a)
	require.Equal(t, 200, <-b)
}

// TestPrefillEndsWhenItsBlocksAreStored: a request's prefill leaves its
// replica's queue when the engine's KV events report the prompt's last full
// block stored (a non-streamed answer's first byte is its last), which
// wakes a waiting request; its first token later counts nothing twice, and
// a lease that ends first leaves nothing filed.
func TestPrefillEndsWhenItsBlocksAreStored(t *testing.T) {
	p, kv, es := holdingPicker(t, 1000)
	addr := es[0].Addr
	toks := ids(1, 1000)
	keys := vllmHasher(t).Keys(toks, "") // 250 blocks of 4
	e, _, l, _, _ := p.pickOrQueue(StrategyPrefixCache, es, hint{model: "m", tokens: toks, promptTokens: 1000}, nil, nil)
	require.NotNil(t, e)
	_, _, _, w, _ := p.pickOrQueue(StrategyPrefixCache, es, hint{model: "m", tokens: ids(50_000, 100), promptTokens: 100}, nil, nil)
	require.NotNil(t, w, "the replica's queue is full: the second waits")

	require.True(t, kv.Apply(addr, 1, []kvevents.Event{{Kind: kvevents.Stored, Hashes: keys[:249]}}))
	require.Equal(t, 1000, p.pending[addr], "the prompt's last block is not stored yet")
	require.Empty(t, w.wake)
	require.True(t, kv.Apply(addr, 2, []kvevents.Event{{Kind: kvevents.Stored, Hashes: keys[249:]}}))
	p.mu.Lock()
	require.Zero(t, p.pending[addr], "prefilled: out of the queue")
	require.Empty(t, p.prefilling)
	p.mu.Unlock()
	require.Len(t, w.wake, 1, "the waiting request is told")
	l.firstToken()
	l.release()
	p.mu.Lock()
	require.Zero(t, p.pending[addr], "the first token counts nothing twice")
	p.mu.Unlock()
	p.leave(w)

	// A lease that ends before its blocks are reported leaves nothing filed.
	_, _, l2, _, _ := p.pickOrQueue(StrategyPrefixCache, es, hint{model: "m", tokens: ids(90_000, 1000), promptTokens: 1000}, nil, nil)
	p.mu.Lock()
	require.Len(t, p.prefilling[addr], 1)
	p.mu.Unlock()
	l2.release()
	p.mu.Lock()
	require.Empty(t, p.prefilling)
	require.Zero(t, p.pending[addr])
	p.mu.Unlock()
	// A prompt already stored whole is not filed (no event will come).
	_, _, l3, _, _ := p.pickOrQueue(StrategyPrefixCache, es, hint{model: "m", tokens: toks, promptTokens: 1000}, nil, nil)
	p.mu.Lock()
	require.Empty(t, p.prefilling)
	p.mu.Unlock()
	l3.release()
}

// TestRouterHoldsBehindANonStreamedPrefill: through the HTTP front, a
// non-streamed request's prefill stops holding others when its engine
// reports the prompt's blocks stored, long before its answer.
func TestRouterHoldsBehindANonStreamedPrefill(t *testing.T) {
	eng, got, start, stop := heldEngine(t)
	r, front := holdingRouter(t, addr(eng), time.Hour)
	t.Cleanup(stop)
	a := sendPrefixCache(context.Background(), front, strings.Replace(prompt(1, 5000), `"stream":true,`, "", 1))
	recv(t, got)
	b := sendPrefixCache(context.Background(), front, prompt(100_000, 100))
	require.Eventually(t, func() bool { return r.picker.waitingNow() == 1 }, 5*time.Second, time.Millisecond)
	keys := vllmHasher(t).Keys(ids(1, 5000), "")
	require.True(t, r.cfg.KV.Apply(addr(eng), 1, []kvevents.Event{{Kind: kvevents.Stored, Hashes: keys}}))
	require.Contains(t, recv(t, got), `"prompt":[100000,`, "the first prompt is prefilled: the held one goes")
	start <- struct{}{}
	start <- struct{}{}
	require.Equal(t, 200, <-a)
	require.Equal(t, 200, <-b)
}
