package plan

import (
	"fmt"
	"time"
)

// The isolation guard: a coordinator that loses sight of a large share of
// the agents at once is more likely cut off itself than looking at a dead
// rack (the reasoning of Kubernetes' node lifecycle controller, which stops
// evicting in an unhealthy zone). While it is, and for a while after its
// view recovered (stale "dead" notices still circulate then), it holds
// re-forms and scaling, and says so. Serving never depends on it: the
// groups run and the routers route without the coordinator.

// Guard timings and thresholds.
const (
	// MassWindow, MassShare and massMin: losing at least this share of the
	// known agents, and at least massMin of them, within the window starts
	// a hold (one or two deaths are deaths, even in a small cluster).
	MassWindow = 10 * time.Second
	MassShare  = 1.0 / 3
	massMin    = 3
	// HoldAfterHeal keeps holding this long once the view has recovered.
	HoldAfterHeal = 15 * time.Second
	// MaxHold bounds a hold: a coordinator that still sees too few agents
	// after it acts again (a real mass failure must not wait for ever).
	MaxHold = 2 * time.Minute
	// minKnown: with fewer known agents no share is meaningful.
	minKnown = 3
)

// Guard is the guard's state, carried from one reconcile pass to the next.
type Guard struct {
	// Holding is true while re-forms and scaling are held.
	Holding bool
	// Since is when the hold began; Until, once the view recovered, when it
	// ends.
	Since, Until time.Time
	// Reason says why, for events and `shoal describe`.
	Reason string
	// Exhausted: MaxHold ran out while the view was still short; the guard
	// stays off until the view recovers.
	Exhausted bool
	// recent are the missing counts seen within MassWindow.
	recent []sample
}

type sample struct {
	at      time.Time
	missing int
}

// Next is the guard after a pass at now that knows of known agents, of
// which visible are in sight.
func (g Guard) Next(now time.Time, known, visible int) Guard {
	missing := max(known-visible, 0)
	keep := g.recent[:0:0]
	low := missing
	for _, s := range g.recent {
		if now.Sub(s.at) <= MassWindow {
			keep = append(keep, s)
			low = min(low, s.missing)
		}
	}
	g.recent = append(keep, sample{now, missing})
	isolated := known >= minKnown && 2*missing > known
	mass := missing-low >= massMin && float64(missing-low) >= MassShare*float64(known)
	short := isolated || mass
	switch {
	case g.Exhausted:
		if !isolated {
			g.Exhausted = false
		}
		return g
	case short && !g.Holding:
		g.Holding, g.Since, g.Until = true, now, time.Time{}
		g.Reason = fmt.Sprintf("the coordinator lost sight of %d of %d agents at once; it may be cut off itself", missing, known)
		if isolated && !mass {
			g.Reason = fmt.Sprintf("the coordinator sees only %d of %d agents; it may be cut off itself", visible, known)
		}
	case g.Holding && now.Sub(g.Since) >= MaxHold && isolated:
		g.Holding, g.Exhausted = false, true
		g.Reason = fmt.Sprintf("still only %d of %d agents in sight after %v: acting on what is in sight", visible, known, MaxHold)
	case g.Holding && short:
		g.Until = time.Time{} // still short: the hold goes on
	case g.Holding && g.Until.IsZero():
		g.Until = now.Add(HoldAfterHeal)
		g.Reason = fmt.Sprintf("the view recovered (%d of %d agents); holding %v more while stale notices settle", visible, known, HoldAfterHeal)
	case g.Holding && !now.Before(g.Until):
		g.Holding = false
		g.Reason = ""
	}
	return g
}

// Wake is when the guard's state changes without any event (zero: never).
func (g Guard) Wake() time.Time {
	if g.Holding && !g.Until.IsZero() {
		return g.Until
	}
	if g.Holding {
		return g.Since.Add(MaxHold)
	}
	return time.Time{}
}
