package agent

import (
	"testing"

	"github.com/shoalhq/shoal/gossip"

	"github.com/stretchr/testify/require"
)

func member(id string, mod func(*gossip.Tag)) gossip.Tag {
	t := gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: id, GRPC: "127.0.0.1:1", Healthy: true, Group: "g", Epoch: 1}
	if mod != nil {
		mod(&t)
	}
	return t
}

func view(self string, tags ...gossip.Tag) GroupView {
	v := GroupView{Self: self, Group: "g", Epoch: 1, Members: map[string]int{"a": 0, "b": 1, "c": 2}, Tags: map[string]gossip.Tag{}}
	for _, t := range tags {
		v.Tags[t.ID] = t
	}
	return v
}

func TestElect(t *testing.T) {
	cases := []struct {
		name      string
		v         GroupView
		candidate string
		complete  bool
		maxTerm   uint64
	}{
		{"lowest rank", view("b", member("a", nil), member("b", nil), member("c", nil)), "a", true, 0},
		{"weights first", view("a", member("a", nil), member("b", nil), member("c", func(t *gossip.Tag) { t.Weights = true })), "c", true, 0},
		{"incumbent stays", view("a", member("a", nil), member("b", func(t *gossip.Tag) { t.HeadTerm = 3 }), member("c", func(t *gossip.Tag) { t.Weights = true })), "b", true, 3},
		{"highest term wins", view("a", member("a", func(t *gossip.Tag) { t.HeadTerm = 2 }), member("b", func(t *gossip.Tag) { t.HeadTerm = 5 }), member("c", nil)), "b", true, 5},
		{"missing member", view("b", member("b", nil), member("c", nil)), "b", false, 0},
		{"unhealthy member", view("b", member("a", func(t *gossip.Tag) { t.Healthy = false }), member("b", nil), member("c", nil)), "b", false, 0},
		{"stale epoch", view("b", member("a", func(t *gossip.Tag) { t.Epoch = 0 }), member("b", nil), member("c", nil)), "b", false, 0},
		{"other group", view("b", member("a", func(t *gossip.Tag) { t.Group = "h" }), member("b", nil), member("c", nil)), "b", false, 0},
		{"follow term counts", view("a", member("a", nil), member("b", func(t *gossip.Tag) { t.FollowTerm = 7 }), member("c", nil)), "a", true, 7},
		{"nobody", view("a"), "", false, 0},
		{"coordinator is not a member", view("a", member("a", func(t *gossip.Tag) { t.Kind = gossip.KindCoordinator }), member("b", nil), member("c", nil)), "b", false, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := Elect(c.v)
			require.Equal(t, c.candidate, d.Candidate)
			require.Equal(t, c.complete, d.Complete)
			require.Equal(t, c.maxTerm, d.MaxTerm)
		})
	}
}

func TestAllFollow(t *testing.T) {
	f := func(head string, term uint64) func(*gossip.Tag) {
		return func(t *gossip.Tag) { t.Follow, t.FollowTerm = head, term }
	}
	v := view("a", member("a", f("a", 2)), member("b", f("a", 2)), member("c", f("a", 2)))
	require.True(t, AllFollow(v, "a", 2))
	require.False(t, AllFollow(v, "a", 1), "old term")
	require.False(t, AllFollow(v, "b", 2))
	v.Tags["c"] = member("c", f("a", 1))
	require.False(t, AllFollow(v, "a", 2), "one member on an old term")
	delete(v.Tags, "c")
	require.False(t, AllFollow(v, "a", 2), "missing member")
	require.False(t, AllFollow(v, "a", 0))
}

// TestNeverTwoHeads explores every combination of per-node views and follow
// choices for a 3-member group: whatever each node believes, at most one node
// can see all members following it at one term, so at most one runs an engine.
func TestNeverTwoHeads(t *testing.T) {
	ids := []string{"a", "b", "c"}
	// Each node's actual published follow choice (one head at one term).
	choices := []struct {
		head string
		term uint64
	}{{"a", 1}, {"b", 1}, {"a", 2}, {"b", 2}, {"c", 2}, {"", 0}}
	n := len(choices)
	for x := 0; x < n*n*n; x++ {
		actual := map[string]gossip.Tag{}
		k := x
		for _, id := range ids {
			c := choices[k%n]
			k /= n
			actual[id] = member(id, func(t *gossip.Tag) { t.Follow, t.FollowTerm = c.head, c.term })
		}
		// A head may run only if its own tag follows itself (it claims) and it
		// sees everyone following. Views are the true tags: gossip delivers each
		// node's newest published tag or an older one, and an older one cannot
		// follow a newer head (a node follows one head at a time, and stops
		// its engine before switching).
		heads := 0
		for _, h := range ids {
			for _, term := range []uint64{1, 2} {
				v := GroupView{Self: h, Group: "g", Epoch: 1, Members: map[string]int{"a": 0, "b": 1, "c": 2}, Tags: actual}
				if AllFollow(v, h, term) {
					heads++
				}
			}
		}
		require.LessOrEqual(t, heads, 1, "views %v", actual)
	}
}

func TestMemberFailed(t *testing.T) {
	v := view("a", member("a", nil), member("b", func(t *gossip.Tag) { t.Engine, t.FollowTerm = gossip.EngineFailed, 2 }), member("c", nil))
	id, ok := MemberFailed(v, 2)
	require.True(t, ok)
	require.Equal(t, "b", id)
	_, ok = MemberFailed(v, 3)
	require.False(t, ok, "a failure at an older term does not fail the new one")
}
