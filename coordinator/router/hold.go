package router

import (
	"container/list"
	"context"
	"time"
)

// Holding at the router (docs/design/kv-events.md §4). With prefix-cache, a
// prompt that no replica has cached (by their engines' KV events) waits here
// while every replica already has HoldPrefillTokens of this router's prefill
// tokens queued, and goes, first come first served, to the first replica
// whose queue drops below.
// An engine that is sent more prompts than it prefills in a step or two
// only queues them, and a long queue on one engine stretches the decode of
// everything it holds (each step carries a full prefill chunk) until its KV
// fills and it preempts: round-robin's tail under overload. Held here, the
// excess forms one queue in front of all replicas, and each prompt is
// bound to a replica only when one has room.

// waiter is one request waiting for room.
type waiter struct {
	wake chan struct{} // a token: room may have appeared (buffered 1)
	elem *list.Element // its place in picker.waiting; nil once out
}

// wakeFront tells the first waiting request to try again. Called with mu
// held.
func (p *picker) wakeFront() {
	if f := p.waiting.Front(); f != nil {
		select {
		case f.Value.(*waiter).wake <- struct{}{}:
		default: // already told
		}
	}
}

// pickOrQueue picks for a request that may wait. It returns the pick; or,
// when the request must wait, no endpoint and its waiter (w, or a new one
// at the back of the queue) and whether it is first in the queue; or
// neither when there is no candidate at all. A request that waited and now
// picks leaves the queue and wakes the next: the room may fit more than one.
func (p *picker) pickOrQueue(strategy string, eps []*Endpoint, h hint, exclude map[string]bool, w *waiter) (*Endpoint, string, *lease, *waiter, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	h.mayWait = true
	h.behind = p.waiting.Len() > 0 && (w == nil || p.waiting.Front() != w.elem)
	e, used, l, held := p.pickLocked(strategy, eps, h, exclude)
	if held {
		if w == nil {
			w = &waiter{wake: make(chan struct{}, 1)}
			w.elem = p.waiting.PushBack(w)
			p.queues.setWaiting(p.waiting.Len())
		}
		return nil, used, nil, w, p.waiting.Front() == w.elem
	}
	p.leaveLocked(w)
	return e, used, l, nil, false
}

// leave takes w out of the queue (it gave up), waking the next if w was
// first. A nil or departed w is a no-op.
func (p *picker) leave(w *waiter) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.leaveLocked(w)
}

func (p *picker) leaveLocked(w *waiter) {
	if w == nil || w.elem == nil {
		return
	}
	first := p.waiting.Front() == w.elem
	p.waiting.Remove(w.elem)
	w.elem = nil
	p.queues.setWaiting(p.waiting.Len())
	if first {
		p.wakeFront()
	}
}

// waitingNow is how many requests wait for room.
func (p *picker) waitingNow() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waiting.Len()
}

// pickWaiting is the first pick of a request: with prefix-cache it may wait
// for room (above), at most HoldPrefillMax, after which it is routed as if
// there were room. It tries again when one of this router's prefills ends
// (wakeFront), and, while first in the queue:
//   - when the routing table's replicas change (reload, nil: keep eps,
//     gives it the replicas there are now): a replica added by a scale-out
//     takes waiting requests at once. A new table with the same replicas
//     (every head report makes one) does not wake it.
//   - when the heads report other routers' queues shorter, if no other
//     router holds requests (none will fill the room) or this router has
//     nothing queued of its own (no prefill of its own will end to wake
//     it). Otherwise their reports, a round trip late, would have every
//     router send into room one of them has just filled.
//
// It returns no endpoint when there is none, or when the client went away
// while it waited.
func (r *Router) pickWaiting(ctx context.Context, strategy string, eps []*Endpoint, h hint, tried map[string]bool, reload func() []*Endpoint) (*Endpoint, string, *lease) {
	if strategy != StrategyPrefixCache || r.picker.holdTokens <= 0 {
		return r.picker.pick(strategy, eps, h, tried)
	}
	var w *waiter
	var start time.Time
	var deadline <-chan time.Time
	for {
		changed, others := r.table.Changed(), r.picker.queues.othersChanged()
		e, used, l, next, first := r.picker.pickOrQueue(strategy, eps, h, tried, w)
		if next == nil {
			if w != nil {
				r.waits.WithLabelValues("picked").Observe(time.Since(start).Seconds())
				r.waiting.Dec()
			}
			return e, used, l
		}
		if w == nil {
			w, start = next, time.Now()
			r.waiting.Inc()
			t := time.NewTimer(r.cfg.HoldPrefillMax)
			defer t.Stop()
			deadline = t.C
		}
		if !first {
			changed, others = nil, nil // never ready
		}
		for again := false; !again; {
			select {
			case <-w.wake:
				again = true
			case <-changed:
				changed = r.table.Changed()
				if reload != nil {
					now := reload()
					again = !sameReplicas(eps, now)
					eps = now
				}
			case <-others:
				others = r.picker.queues.othersChanged()
				again = !r.picker.queuedAnywhere() || !r.picker.queues.othersHolding()
			case <-deadline:
				r.picker.leave(w)
				r.waits.WithLabelValues("timeout").Observe(time.Since(start).Seconds())
				r.waiting.Dec()
				return r.picker.pick(strategy, eps, h, tried)
			case <-ctx.Done():
				r.picker.leave(w)
				r.waits.WithLabelValues("canceled").Observe(time.Since(start).Seconds())
				r.waiting.Dec()
				return nil, strategy, nil
			}
		}
	}
}

// sameReplicas: a and b name the same endpoints.
func sameReplicas(a, b []*Endpoint) bool {
	if len(a) != len(b) {
		return false
	}
	ids := make(map[string]bool, len(a))
	for _, e := range a {
		ids[e.ID()] = true
	}
	for _, e := range b {
		if !ids[e.ID()] {
			return false
		}
	}
	return true
}

// queuedAnywhere: this router has prefill tokens queued at some replica.
func (p *picker) queuedAnywhere() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pending) > 0
}
