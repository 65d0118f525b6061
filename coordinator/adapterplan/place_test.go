package adapterplan

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func ads(names ...string) []Adapter {
	var out []Adapter
	for _, n := range names {
		out = append(out, Adapter{Name: n})
	}
	return out
}

func TestPlace(t *testing.T) {
	two := func(held1, held2 []string) []Replica {
		return []Replica{{Group: "g1", Serving: true, Slots: 2, Held: held1}, {Group: "g2", Serving: true, Slots: 2, Held: held2}}
	}
	for _, tc := range []struct {
		name string
		in   Input
		want Output
	}{
		{"spread over the replicas with the fewest pins", Input{Adapters: ads("a", "b", "c"), Replicas: two(nil, nil)},
			Output{Pins: map[string][]string{"g1": {"a", "c"}, "g2": {"b"}}}},
		{"a replica holding it wins", Input{Adapters: ads("a", "b"), Replicas: two(nil, []string{"a"})},
			Output{Pins: map[string][]string{"g1": {"b"}, "g2": {"a"}}}},
		{"pins stay where they were", Input{Adapters: ads("a", "b"), Replicas: two(nil, nil), Pins: map[string][]string{"g2": {"a", "b"}}},
			Output{Pins: map[string][]string{"g1": nil, "g2": {"a", "b"}}}},
		{"a pin on a re-forming replica stays", Input{Adapters: ads("a"),
			Replicas: []Replica{{Group: "g1", Slots: 2}, {Group: "g2", Serving: true, Slots: 2}}, Pins: map[string][]string{"g1": {"a"}}},
			Output{Pins: map[string][]string{"g1": {"a"}, "g2": nil}}},
		{"a new pin goes to a serving replica", Input{Adapters: ads("a"), Replicas: []Replica{{Group: "g1", Slots: 2}, {Group: "g2", Serving: true, Slots: 2}}},
			Output{Pins: map[string][]string{"g1": nil, "g2": {"a"}}}},
		{"no slot left: unplaced", Input{Adapters: ads("a", "b", "c", "d", "e"), Replicas: two(nil, nil)},
			Output{Pins: map[string][]string{"g1": {"a", "c"}, "g2": {"b", "d"}}, Unplaced: []string{"e"}}},
		{"removed adapters lose their pins", Input{Adapters: ads("a"), Replicas: two(nil, nil), Pins: map[string][]string{"g1": {"gone", "a"}}},
			Output{Pins: map[string][]string{"g1": {"a"}, "g2": nil}}},
		{"past the bound, extra holders drop it", Input{Adapters: []Adapter{{Name: "a", MaxReplicas: 1}},
			Replicas: two([]string{"a"}, []string{"a"}), Pins: map[string][]string{"g1": {"a"}}},
			Output{Pins: map[string][]string{"g1": {"a"}, "g2": nil}, Drop: map[string][]string{"g2": {"a"}}}},
		{"a re-formed replica gets back what it held", Input{Adapters: ads("a", "b", "c"), Replicas: two(nil, nil),
			Pins: map[string][]string{"g1": {"a"}, "g2": {"b", "c"}}, Remembered: map[string][]string{"g1": {"a", "c", "gone"}}},
			Output{Pins: map[string][]string{"g1": {"a"}, "g2": {"b", "c"}}, Warm: map[string][]string{"g1": {"c"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Place(tc.in)
			if tc.want.Warm == nil {
				tc.want.Warm = map[string][]string{}
			}
			if tc.want.Drop == nil {
				tc.want.Drop = map[string][]string{}
			}
			require.Equal(t, tc.want, got)
		})
	}
}

// Every adapter is pinned exactly once while slots allow, and no replica
// gets more pins than slots.
func TestPlaceInvariants(t *testing.T) {
	for n := 0; n < 40; n++ {
		var names []string
		for i := 0; i < n; i++ {
			names = append(names, string(rune('a'+i%26))+string(rune('a'+i/26)))
		}
		in := Input{Adapters: ads(names...), Replicas: []Replica{{Group: "g1", Serving: true, Slots: 8}, {Group: "g2", Serving: true, Slots: 8},
			{Group: "g3", Serving: true, Slots: 4}}}
		out := Place(in)
		seen := map[string]int{}
		for g, ps := range out.Pins {
			for _, r := range in.Replicas {
				if r.Group == g {
					require.LessOrEqual(t, len(ps), r.Slots)
				}
			}
			for _, p := range ps {
				seen[p]++
			}
		}
		require.Equal(t, min(n, 20), len(seen), "n=%d", n)
		require.Len(t, out.Unplaced, max(0, n-20))
		for _, c := range seen {
			require.Equal(t, 1, c)
		}
	}
}
