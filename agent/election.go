package agent

import (
	"sort"

	"github.com/shoalhq/shoal/gossip"
)

// GroupView is one member's picture of its group, from gossip.
type GroupView struct {
	Self  string
	Group string
	Epoch uint64
	// Members maps node id → rank, from the assignment.
	Members map[string]int
	// Tags are the live nodes' tags (memberlist alive state), self included.
	Tags map[string]gossip.Tag
}

// Election is what the election rule says for one member.
type Election struct {
	// Eligible are the members alive, healthy and on this group and epoch.
	Eligible []string
	// Complete is true when every member is eligible: only then may anything run.
	Complete bool
	// Candidate is the member that should be head ("" when none is eligible).
	Candidate string
	// MaxTerm is the highest term any eligible member claims or follows.
	MaxTerm uint64
}

// eligible reports whether a member's tag shows it ready to take part.
func (v GroupView) eligible(id string) (gossip.Tag, bool) {
	t, ok := v.Tags[id]
	if !ok || t.Kind != gossip.KindAgent || !t.Healthy || t.Group != v.Group || t.Epoch != v.Epoch {
		return t, false
	}
	return t, true
}

// Elect computes the head candidate. Every member runs the same rule on its
// own view: a member that already claims head (the highest term wins, then the
// lowest rank) stays head, so a running replica is not disturbed; otherwise the
// members with weights already present come first, then the lowest rank.
//
// Safety does not rest on views agreeing: a head runs its engine only once all
// N members follow it at its term (AllFollow), a member follows one head at a
// time, and a head stops its engine before it follows anyone else. Two heads
// can therefore never both see all N followers in the same epoch.
func Elect(v GroupView) Election {
	var d Election
	type cand struct {
		id      string
		rank    int
		term    uint64
		weights bool
	}
	var cs []cand
	for id, rank := range v.Members {
		t, ok := v.eligible(id)
		if !ok {
			continue
		}
		d.Eligible = append(d.Eligible, id)
		cs = append(cs, cand{id, rank, t.HeadTerm, t.Weights})
		d.MaxTerm = max(d.MaxTerm, t.HeadTerm, t.FollowTerm)
	}
	sort.Strings(d.Eligible)
	d.Complete = len(v.Members) > 0 && len(d.Eligible) == len(v.Members)
	if len(cs) == 0 {
		return d
	}
	sort.Slice(cs, func(i, j int) bool {
		a, b := cs[i], cs[j]
		if a.term != b.term {
			return a.term > b.term // an incumbent claim wins
		}
		if a.weights != b.weights {
			return a.weights
		}
		if a.rank != b.rank {
			return a.rank < b.rank
		}
		return a.id < b.id
	})
	d.Candidate = cs[0].id
	return d
}

// AllFollow reports whether every member is eligible and follows head at term.
func AllFollow(v GroupView, head string, term uint64) bool {
	if term == 0 || len(v.Members) == 0 {
		return false
	}
	for id := range v.Members {
		t, ok := v.eligible(id)
		if !ok || t.Follow != head || t.FollowTerm != term {
			return false
		}
	}
	return true
}

// MemberFailed reports a member that advertises a failed engine at term.
func MemberFailed(v GroupView, term uint64) (string, bool) {
	for id := range v.Members {
		if t, ok := v.Tags[id]; ok && t.Engine == gossip.EngineFailed && t.FollowTerm == term && t.Group == v.Group && t.Epoch == v.Epoch {
			return id, true
		}
	}
	return "", false
}
