package router

import (
	"context"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Queues is what the routers in front of the same replicas share of their
// prefill queues (docs/design/kv-events.md §4): this router's own queued
// tokens per endpoint, which the watcher sends each head over the Replica
// API's Queue stream, and the other routers' sums as the heads report them.
// prefix-cache adds the others' queue to its own; without it, with two
// routers each sees about half of every queue and holds at twice the level.
// The others' counts arrive a round trip late, so a report of them shorter
// wakes a held request only where no other router holds requests of its
// own (one that does fills the room itself, and two routers sending into
// the same room overfill it: measured, the replicas then preempt as
// without holding) or where this router has nothing queued (no prefill of
// its own will end to wake it).
type Queues struct {
	mu            sync.Mutex
	own           map[string]int64                      // guarded by mu; endpoint id → this router's queued tokens (the picker's pending, readable without its lock)
	others        map[string]int64                      // guarded by mu; endpoint id → the other routers', as its head said
	othersWaiting map[string]int64                      // guarded by mu; endpoint id → the requests the other routers hold, as its head said
	waiting       int64                                 // guarded by mu; the requests this router holds
	subs          map[string]map[chan struct{}]struct{} // guarded by mu; endpoint id → the head streams that report it
	// changed is closed, and replaced, when a head reports the others'
	// queues shorter somewhere or that they stopped holding (a held
	// request may fit).
	changed chan struct{} // guarded by mu
}

// NewQueues returns an empty view.
func NewQueues() *Queues {
	return &Queues{own: map[string]int64{}, others: map[string]int64{}, othersWaiting: map[string]int64{},
		subs: map[string]map[chan struct{}]struct{}{}, changed: make(chan struct{})}
}

// setOwn records this router's queue at id and tells the stream that
// reports id. A nil q is a no-op (no sharing).
func (q *Queues) setOwn(id string, n int) {
	if q == nil {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.own[id] == int64(n) {
		return
	}
	if n <= 0 {
		delete(q.own, id)
	} else {
		q.own[id] = int64(n)
	}
	for ch := range q.subs[id] {
		tell(ch)
	}
}

// setWaiting records how many requests this router holds. Only a start or
// an end of holding tells the head streams at once (the others act only on
// whether it holds); the count goes along with the next report anyway, so
// a busy router's queue of held requests does not send a message to every
// head each time it moves. A nil q is a no-op.
func (q *Queues) setWaiting(n int) {
	if q == nil {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	was := q.waiting > 0
	q.waiting = int64(n)
	if was == (n > 0) {
		return
	}
	for _, chs := range q.subs {
		for ch := range chs {
			tell(ch)
		}
	}
}

// othersHolding: a head says another router holds requests for room.
func (q *Queues) othersHolding() bool {
	if q == nil {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, n := range q.othersWaiting {
		if n > 0 {
			return true
		}
	}
	return false
}

// tell leaves a token in ch unless one is there.
func tell(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// othersAtEach is the other routers' queue at each of es, in one hold of
// the lock (nil without sharing: none anywhere).
func (q *Queues) othersAtEach(es []*Endpoint) []int {
	if q == nil {
		return nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]int, len(es))
	for i, e := range es {
		out[i] = int(q.others[e.ID()])
	}
	return out
}

// Own is this router's queue at each of ids (left out: nothing queued),
// and the requests it holds.
func (q *Queues) Own(ids []string) (map[string]int64, int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make(map[string]int64, len(ids))
	for _, id := range ids {
		if n := q.own[id]; n > 0 {
			out[id] = n
		}
	}
	return out, q.waiting
}

// SetOthers replaces the other routers' queues at ids (a head reports the
// endpoints it serves; absent from others means none) and the requests
// they hold, as that head says.
func (q *Queues) SetOthers(ids []string, others map[string]int64, waiting int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	shorter := false
	for _, id := range ids {
		n := max(0, others[id])
		shorter = shorter || n < q.others[id] || (waiting <= 0 && q.othersWaiting[id] > 0)
		if n > 0 {
			q.others[id] = n
		} else {
			delete(q.others, id)
		}
		if waiting > 0 {
			q.othersWaiting[id] = waiting
		} else {
			delete(q.othersWaiting, id)
		}
	}
	if shorter {
		close(q.changed)
		q.changed = make(chan struct{})
	}
}

// othersChanged is closed when a head next reports the other routers'
// queues shorter somewhere, or that they stopped holding requests (nil
// without sharing: never).
func (q *Queues) othersChanged() <-chan struct{} {
	if q == nil {
		return nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.changed
}

// subscribe: ch gets a token whenever this router's queue at one of ids
// changes, until unsubscribe.
func (q *Queues) subscribe(ch chan struct{}, ids []string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, id := range ids {
		if q.subs[id] == nil {
			q.subs[id] = map[chan struct{}]struct{}{}
		}
		q.subs[id][ch] = struct{}{}
	}
}

func (q *Queues) unsubscribe(ch chan struct{}, ids []string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, id := range ids {
		delete(q.subs[id], ch)
		if len(q.subs[id]) == 0 {
			delete(q.subs, id)
		}
	}
}

// queueRetry is how long a watcher waits before asking a head that does
// not serve Queue (one from before it) again.
const queueRetry = 30 * time.Second

// watchQueue shares this router's queues at one head's endpoints over its
// Queue stream, reconnecting until ctx ends. ids says the head's endpoints
// now (they are known from its Watch reports; none yet: wait).
func (h *Watcher) watchQueue(ctx context.Context, cl replicav1.ReplicaClient, ids func() []string) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		err := h.shareQueue(ctx, cl, ids, func() { backoff = 200 * time.Millisecond })
		if ctx.Err() != nil {
			return
		}
		wait := backoff
		if status.Code(err) == codes.Unimplemented {
			wait = queueRetry
		} else {
			backoff = min(backoff*2, 5*time.Second)
		}
		h.log.Debug("queue stream ended; reconnecting", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// shareQueue runs one Queue stream: it sends this router's counts at the
// head's endpoints when they change (the latest when it gets to send: the
// changes of a moment coalesce) and applies what the head says of the
// others'. When the stream ends the others' counts there are forgotten.
func (h *Watcher) shareQueue(ctx context.Context, cl replicav1.ReplicaClient, ids func() []string, healthy func()) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var known []string // the endpoints the others' counts were set for; the receiver's until wg.Wait
	defer func() {
		cancel()
		wg.Wait()
		h.queues.SetOthers(known, nil, 0) // this head says nothing more
	}()
	stream, err := cl.Queue(ctx)
	if err != nil {
		return err
	}
	recvErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			healthy()
			now := ids()
			h.queues.SetOthers(slices.DeleteFunc(known, func(id string) bool { return slices.Contains(now, id) }), nil, 0) // no longer the head's
			known = now
			h.queues.SetOthers(known, m.GetOthers(), m.GetOthersWaiting())
		}
	}()
	changed := make(chan struct{}, 1)
	var subscribed []string
	defer func() { h.queues.unsubscribe(changed, subscribed) }()
	tick := time.NewTicker(time.Second) // the head's endpoints may change
	defer tick.Stop()
	var last map[string]int64
	var lastWaiting int64
	for {
		if now := ids(); !slices.Equal(now, subscribed) {
			h.queues.unsubscribe(changed, subscribed)
			subscribed = now
			h.queues.subscribe(changed, subscribed)
		}
		if own, waiting := h.queues.Own(subscribed); last == nil || !maps.Equal(own, last) || waiting != lastWaiting {
			if err := stream.Send(&replicav1.QueueReport{Tokens: own, Waiting: waiting}); err != nil {
				return <-recvErr // Send fails with io.EOF; the status is on Recv
			}
			last, lastWaiting = own, waiting
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-recvErr:
			return err
		case <-changed:
		case <-tick.C:
		}
	}
}

// endpointIDs is head k's endpoints as the router's table names them
// (sorted), from its latest report; nil before one.
func (h *Watcher) endpointIDs(k HeadKey) []string {
	h.mu.Lock()
	st, ok := h.m[k]
	var v ReplicaView
	if ok && st.latest != nil {
		v = ReplicaView{Key: k, Info: st.info, Metrics: st.latest}
	}
	h.mu.Unlock()
	if v.Metrics == nil {
		return nil
	}
	var ids []string
	for _, e := range endpointsOf(v) {
		if e.Addr != "" {
			ids = append(ids, e.ID())
		}
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// totals is this router's queued prefill tokens and the other routers', all
// replicas.
func (q *Queues) totals() (own, others int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, n := range q.own {
		own += n
	}
	for _, n := range q.others {
		others += n
	}
	return own, others
}

func registerQueueMetrics(reg *prometheus.Registry, q *Queues) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "shoal_router_queued_prefill_tokens",
		Help:        "Prompt tokens this router has sent and not seen prefilled, all replicas (prefix-cache).",
		ConstLabels: prometheus.Labels{"router": "this"}}, func() float64 { n, _ := q.totals(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "shoal_router_queued_prefill_tokens",
			Help:        "Prompt tokens this router has sent and not seen prefilled, all replicas (prefix-cache).",
			ConstLabels: prometheus.Labels{"router": "others"}}, func() float64 { _, n := q.totals(); return float64(n) }))
}
