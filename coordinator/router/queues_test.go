package router

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/shoalhq/shoal/agent/queueboard"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// queueHead is a head serving only the Replica API's Queue streams, on the
// agent's own board.
type queueHead struct {
	replicav1.UnimplementedReplicaServer
	b *queueboard.Board
}

func (q *queueHead) Queue(st replicav1.Replica_QueueServer) error { return queueboard.Serve(q.b, st) }

// TestRoutersShareQueuesThroughTheHead: two routers' watchers on one head's
// Queue stream: each router's picks and prefills show in the other's view
// of that replica's queue, and a router that goes away takes its queue with
// it; a router whose stream ends forgets the others' counts.
func TestRoutersShareQueuesThroughTheHead(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer()
	replicav1.RegisterReplicaServer(srv, &queueHead{b: queueboard.New()})
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()

	const ep = "10.0.0.1:8000"
	endpoints := func() []string { return []string{ep} }
	type rt struct {
		w      *Watcher
		p      *picker
		cancel context.CancelFunc
		done   chan struct{}
	}
	start := func() *rt {
		w := NewWatcher(quietLog(), func() {}, nil)
		kv := NewKVIndex(0)
		r := &rt{w: w, p: newPickerWith(time.Now, 1, kv, w.Queues()), done: make(chan struct{})}
		withEvents(t, kv, []*Endpoint{{Model: "m", Addr: ep}})
		var ctx context.Context
		ctx, r.cancel = context.WithCancel(context.Background())
		go func() {
			defer close(r.done)
			w.watchQueue(ctx, replicav1.NewReplicaClient(conn), endpoints)
		}()
		return r
	}
	a, b := start(), start()
	es := []*Endpoint{{Model: "m", Addr: ep}}

	_, _, la := a.p.pick(StrategyPrefixCache, es, hint{model: "m", tokens: ids(1, 3000), promptTokens: 3000}, nil)
	require.Eventually(t, func() bool { return b.w.Queues().othersAt(ep) == 3000 }, 10*time.Second, time.Millisecond,
		"b sees a's 3,000 queued tokens")
	_, _, lb := b.p.pick(StrategyPrefixCache, es, hint{model: "m", tokens: ids(10_000, 500), promptTokens: 500}, nil)
	require.Eventually(t, func() bool { return a.w.Queues().othersAt(ep) == 500 }, 10*time.Second, time.Millisecond)
	require.Equal(t, 3000, b.w.Queues().othersAt(ep), "a router never counts its own queue as another's")

	la.firstToken() // a's prefill is done
	require.Eventually(t, func() bool { return b.w.Queues().othersAt(ep) == 0 }, 10*time.Second, time.Millisecond)
	la.release()

	b.cancel() // b goes away with 500 queued
	<-b.done
	require.Eventually(t, func() bool { return a.w.Queues().othersAt(ep) == 0 }, 10*time.Second, time.Millisecond,
		"a router that leaves takes its queue with it")
	require.Zero(t, b.w.Queues().othersAt(ep))
	lb.release()

	// A router whose head stream ends forgets what it said of the others.
	c := start()
	_, _, lc := c.p.pick(StrategyPrefixCache, es, hint{model: "m", tokens: ids(20_000, 700), promptTokens: 700}, nil)
	require.Eventually(t, func() bool { return a.w.Queues().othersAt(ep) == 700 }, 10*time.Second, time.Millisecond)
	a.cancel()
	<-a.done
	require.Zero(t, a.w.Queues().othersAt(ep), "no stream, no others' counts")
	lc.release()
	c.cancel()
	<-c.done
}

// TestHeldRequestAtARouterWithNothingQueued: a router with nothing of its
// own queued holds a prompt while the other routers' queues fill every
// replica, and sends it when a head reports them shorter (no prefill of its
// own would wake it).
func TestHeldRequestAtARouterWithNothingQueued(t *testing.T) {
	r, front, q, ep, tb, got, startEng := sharingRouter(t)

	q.SetOthers([]string{ep.ID()}, map[string]int64{ep.ID(): 5000}, 0) // the other routers' queue: past the level
	a := sendPrefixCache(context.Background(), front, prompt(1, 100))
	require.Eventually(t, func() bool { return r.picker.waitingNow() == 1 }, 5*time.Second, time.Millisecond)
	require.Empty(t, got)
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{ep})) // a new table, the same replica: still no room
	q.SetOthers([]string{ep.ID()}, map[string]int64{ep.ID(): 1000}, 0)
	require.Contains(t, recv(t, got), `"prompt":[1,`, "room beside the others' queue: sent")
	mf, err := r.cfg.Registry.Gather()
	require.NoError(t, err)
	seen := map[string]float64{}
	for _, f := range mf {
		if f.GetName() == "shoal_router_queued_prefill_tokens" {
			for _, m := range f.GetMetric() {
				seen[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
			}
		}
	}
	require.Equal(t, map[string]float64{"this": 100, "others": 1000}, seen)
	startEng <- struct{}{}
	require.Equal(t, 200, <-a)
}

// TestHeldRequestWhenTheOthersStopHolding: a router with a prefill of its
// own queued holds a prompt while its queue and the other routers' fill the
// replica; when the head reports that the others hold nothing any more (so
// none of them will take the room), the held prompt goes at once, before
// its own prefill ends.
func TestHeldRequestWhenTheOthersStopHolding(t *testing.T) {
	r, front, q, ep, _, got, startEng := sharingRouter(t)
	id := []string{ep.ID()}

	q.SetOthers(id, map[string]int64{ep.ID(): 3000}, 1) // another router: 3,000 queued, 1 held
	a := sendPrefixCache(context.Background(), front, prompt(1, 2000))
	require.Contains(t, recv(t, got), `"prompt":[1,`, "2,000 + 3,000 queued: room for the first")
	b := sendPrefixCache(context.Background(), front, prompt(50_000, 100))
	require.Eventually(t, func() bool { return r.picker.waitingNow() == 1 }, 5*time.Second, time.Millisecond)
	own, waiting := q.Own(id)
	require.Equal(t, map[string]int64{ep.ID(): 2000}, own)
	require.Equal(t, int64(1), waiting, "the heads are told this router holds one")
	q.SetOthers(id, map[string]int64{ep.ID(): 1000}, 0) // it sent its held request: shorter, nothing held
	require.Contains(t, recv(t, got), `"prompt":[50000,`, "room, and no other router to fill it: sent")
	startEng <- struct{}{}
	startEng <- struct{}{}
	require.Equal(t, 200, <-a)
	require.Equal(t, 200, <-b)
	_, waiting = q.Own(id)
	require.Zero(t, waiting)
}

// sharingRouter is a router sharing its queues through q (a head's reports
// are what the test sets there) in front of one held engine that sends KV
// events; got has what the engine was sent, and each token on startEng
// lets one answer begin.
func sharingRouter(t *testing.T) (*Router, *httptest.Server, *Queues, *Endpoint, *Table, chan string, chan struct{}) {
	eng, got, startEng, stop := heldEngine(t)
	t.Cleanup(stop)
	kv, q := NewKVIndex(0), NewQueues()
	ep := &Endpoint{Model: "m", Addr: addr(eng), Group: "g1"}
	withEvents(t, kv, []*Endpoint{ep})
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{ep}))
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{KV: kv, Queues: q, HoldPrefillMax: time.Hour})
	front := httptest.NewServer(r.Handler())
	t.Cleanup(front.Close)
	return r, front, q, ep, tb, got, startEng
}

// othersAt is the other routers' queue at id, as the heads last said.
func (q *Queues) othersAt(id string) int { return q.othersAtEach([]*Endpoint{{Addr: id}})[0] }
