// Package adapterplan decides which replicas of a deployment hold which
// LoRA adapters (docs/design/adapters.md §A4): a pure function of the
// adapters, the replicas' reports and the last decision.
//
// The rule, in two lines: every adapter is pinned on one replica — the one
// that had it, else one holding it, else the one with the fewest pins that
// has a slot — and more replicas load it on demand (routers ask), within
// its bound; a re-formed replica gets back what it held.
package adapterplan

import (
	"slices"
	"sort"
)

// Adapter is one adapter of the deployment.
type Adapter struct {
	Name        string
	MaxReplicas int // 0: any number
}

// Replica is one group of the deployment, as its head reports it.
type Replica struct {
	Group string
	// Serving: the head reports its engine ready (a pin on a replica that
	// does not serve waits for it; a new pin goes to one that serves).
	Serving bool
	Slots   int
	// Held are the adapters it has loaded (or is loading).
	Held []string
}

// Input is what the decision reads.
type Input struct {
	Adapters []Adapter
	Replicas []Replica
	// Pins is the last decision's pins by group.
	Pins map[string][]string
	// Remembered is what each group held the last time it served.
	Remembered map[string][]string
}

// Output is the decision for every replica.
type Output struct {
	Pins map[string][]string
	// Warm: load when a slot is free (held before, not pinned now).
	Warm map[string][]string
	// Drop: held on more replicas than the adapter's bound.
	Drop map[string][]string
	// Unplaced: adapters no replica has a slot to pin (served on demand).
	Unplaced []string
}

// Place decides.
func Place(in Input) Output {
	out := Output{Pins: map[string][]string{}, Warm: map[string][]string{}, Drop: map[string][]string{}}
	byGroup := map[string]*Replica{}
	groups := make([]string, 0, len(in.Replicas))
	for i := range in.Replicas {
		r := &in.Replicas[i]
		byGroup[r.Group] = r
		groups = append(groups, r.Group)
		out.Pins[r.Group] = nil
	}
	sort.Strings(groups)
	ads := slices.Clone(in.Adapters)
	sort.Slice(ads, func(i, j int) bool { return ads[i].Name < ads[j].Name })
	known := map[string]bool{}
	for _, a := range ads {
		known[a.Name] = true
	}
	room := func(g string) bool { return len(out.Pins[g]) < byGroup[g].Slots }
	pin := func(g, name string) { out.Pins[g] = append(out.Pins[g], name) }
	// Sticky first: a pin stays on its replica while the replica exists.
	pinned := map[string]bool{}
	for _, g := range groups {
		for _, n := range in.Pins[g] {
			if known[n] && !pinned[n] && room(g) {
				pin(g, n)
				pinned[n] = true
			}
		}
	}
	for _, a := range ads {
		if pinned[a.Name] {
			continue
		}
		best := ""
		for _, g := range groups {
			r := byGroup[g]
			if !r.Serving || !room(g) {
				continue
			}
			holds := slices.Contains(r.Held, a.Name)
			if best == "" {
				best = g
				continue
			}
			b := byGroup[best]
			bh := slices.Contains(b.Held, a.Name)
			switch {
			case holds != bh:
				if holds {
					best = g
				}
			case len(out.Pins[g]) != len(out.Pins[best]):
				if len(out.Pins[g]) < len(out.Pins[best]) {
					best = g
				}
			case len(r.Held) < len(b.Held):
				best = g
			}
		}
		if best == "" {
			out.Unplaced = append(out.Unplaced, a.Name)
			continue
		}
		pin(best, a.Name)
		pinned[a.Name] = true
	}
	// The bound: holders past it give it up (never the pinned one).
	for _, a := range ads {
		if a.MaxReplicas <= 0 {
			continue
		}
		var holders []string
		for _, g := range groups {
			if slices.Contains(byGroup[g].Held, a.Name) || slices.Contains(out.Pins[g], a.Name) {
				holders = append(holders, g)
			}
		}
		extra := len(holders) - a.MaxReplicas
		for i := len(holders) - 1; i >= 0 && extra > 0; i-- {
			g := holders[i]
			if slices.Contains(out.Pins[g], a.Name) {
				continue
			}
			out.Drop[g] = append(out.Drop[g], a.Name)
			extra--
		}
	}
	// What a replica held before it was re-formed comes back.
	for _, g := range groups {
		for _, n := range in.Remembered[g] {
			if known[n] && !slices.Contains(out.Pins[g], n) && !slices.Contains(out.Drop[g], n) {
				out.Warm[g] = append(out.Warm[g], n)
			}
		}
	}
	return out
}
