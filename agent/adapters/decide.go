// Package adapters keeps a replica head's LoRA adapters: which of its
// deployment's adapters the engine holds, loading and unloading them
// through the engine's API (docs/design/adapters.md §A3).
//
// Decide is the rule, a pure function of the adapters' states, the slots
// and the time; Manager is the executor that owns the goroutine doing the
// downloads and the engine calls, one at a time.
package adapters

import (
	"sort"
	"time"
)

// States of an adapter on a replica.
const (
	None        = ""
	Pending     = "pending"
	Downloading = "downloading"
	Loading     = "loading"
	Loaded      = "loaded"
	Failed      = "failed"
)

// MaxAttempts is how many loads in a row may fail before an adapter stays
// failed (until its spec changes or a router asks for it again); the waits
// between them double from RetryBase up to RetryMax (AIBrix retries five
// times, 5 to 80 s).
const (
	MaxAttempts = 5
	RetryBase   = 5 * time.Second
	RetryMax    = 80 * time.Second
)

// Entry is one adapter as Decide sees it.
type Entry struct {
	Name    string
	State   string
	InSpec  bool // in the deployment's catalog
	Pinned  bool // the coordinator has this replica hold it
	Warm    bool // held before a re-form: load when a slot is free
	Dropped bool // the coordinator has this replica give it up
	// Asked is when a router last asked for it (zero: not waiting).
	Asked    time.Time
	LastUsed time.Time
	Busy     bool // requests run or wait on it now
	Fails    int
	RetryAt  time.Time
}

// Action is what to do next.
type Action struct {
	// Kind: "", "load", "unload" (not wanted any more) or "evict" (make
	// room for Name's load: Victim goes).
	Kind   string
	Name   string
	Victim string
	// Refuse: the adapters asked for that cannot get a slot (every slot
	// holds a pinned, busy or asked-for adapter).
	Refuse []string
	// Wake is when to decide again at the latest (zero: on the next event).
	Wake time.Time
}

// wantedNow says whether e should be loaded, and how urgently (lower first).
func wantedNow(e Entry, now time.Time) (int, bool) {
	if !e.InSpec || e.Dropped || e.State == Loaded {
		return 0, false
	}
	if !e.Asked.IsZero() {
		return 0, true // a request waits on it; a failure is retried at once
	}
	if e.Fails >= MaxAttempts || e.RetryAt.After(now) {
		return 0, false
	}
	switch {
	case e.Pinned:
		return 1, true
	case e.Warm:
		return 2, true
	}
	return 0, false
}

// Decide returns the next action for a replica with slots adapter slots.
func Decide(es []Entry, slots int, now time.Time) Action {
	var act Action
	loaded := 0
	for _, e := range es {
		if e.State == Loaded {
			loaded++
		}
		if !e.RetryAt.IsZero() && e.RetryAt.After(now) && e.Fails < MaxAttempts && (e.Pinned || e.Warm) && e.InSpec && !e.Dropped {
			if act.Wake.IsZero() || e.RetryAt.Before(act.Wake) {
				act.Wake = e.RetryAt
			}
		}
	}
	// Give up what is no longer wanted first: it frees slots (an unload
	// that failed is tried again at its RetryAt).
	for _, e := range es {
		if e.State == Loaded && (!e.InSpec || (e.Dropped && !e.Pinned && e.Asked.IsZero())) {
			if e.RetryAt.After(now) {
				if act.Wake.IsZero() || e.RetryAt.Before(act.Wake) {
					act.Wake = e.RetryAt
				}
				continue
			}
			return Action{Kind: "unload", Name: e.Name}
		}
	}
	var want []Entry
	for _, e := range es {
		if _, ok := wantedNow(e, now); ok {
			want = append(want, e)
		}
	}
	sort.SliceStable(want, func(i, j int) bool {
		pi, _ := wantedNow(want[i], now)
		pj, _ := wantedNow(want[j], now)
		if pi != pj {
			return pi < pj
		}
		if !want[i].Asked.Equal(want[j].Asked) {
			return want[i].Asked.Before(want[j].Asked)
		}
		return want[i].Name < want[j].Name
	})
	for _, w := range want {
		if loaded < slots {
			act.Kind, act.Name = "load", w.Name
			return act
		}
		if w.Warm && !w.Pinned && w.Asked.IsZero() {
			continue // warm adapters fill free slots only
		}
		if v, ok := victim(es, w, now); ok {
			act.Kind, act.Name, act.Victim = "evict", w.Name, v
			return act
		}
		if !w.Asked.IsZero() {
			act.Refuse = append(act.Refuse, w.Name)
		}
	}
	return act
}

// victim is the least recently used loaded adapter that may make room for
// w: not pinned, not busy, not asked for, not just failed to unload.
func victim(es []Entry, w Entry, now time.Time) (string, bool) {
	best := -1
	for i, e := range es {
		if e.State != Loaded || e.Pinned || e.Busy || !e.Asked.IsZero() || e.Name == w.Name || e.RetryAt.After(now) {
			continue
		}
		if best < 0 || e.LastUsed.Before(es[best].LastUsed) || (e.LastUsed.Equal(es[best].LastUsed) && e.Name < es[best].Name) {
			best = i
		}
	}
	if best < 0 {
		return "", false
	}
	return es[best].Name, true
}

// Backoff is the wait after the n-th failure in a row.
func Backoff(n int) time.Duration {
	d := RetryBase
	for i := 1; i < n && d < RetryMax; i++ {
		d *= 2
	}
	return min(d, RetryMax)
}
