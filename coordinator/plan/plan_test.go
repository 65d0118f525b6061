package plan

import (
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

func demo(replicas int) Deployment {
	return Deployment{Name: "demo", Desired: replicas, Spec: &spec.Deployment{Name: "demo",
		Engine: spec.Engine{ServedModelName: "demo"}, Resources: spec.Resources{Nodes: 2, GPUsPerNode: 8, GPUModel: "H200"}}}
}

func grp(id string, epoch uint64, created int, members ...string) *store.Group {
	g := &store.Group{ID: id, Deployment: "demo", Epoch: epoch, Created: t0.Add(time.Duration(created) * time.Minute)}
	for i, m := range members {
		g.Members = append(g.Members, store.GroupMember{NodeID: m, Rank: i, GRPC: m + ":7947"})
	}
	return g
}

// agent is an idle healthy 8×H200 node.
func agent(id string, mods ...func(*gossip.Tag)) gossip.Tag {
	t := gossip.Tag{Kind: gossip.KindAgent, ID: id, GRPC: id + ":7947", GPUs: 8, GPUModel: "H200", Healthy: true, GPUMemGiB: 141}
	for _, m := range mods {
		m(&t)
	}
	return t
}

// in puts a node in g at its epoch with an engine state; head claims term 1.
func in(g *store.Group, es string, head bool) func(*gossip.Tag) {
	return func(t *gossip.Tag) {
		t.Deployment, t.Group, t.Epoch, t.Size, t.Engine = g.Deployment, g.ID, g.Epoch, len(g.Members), es
		if head {
			t.HeadTerm, t.Replica = 1, t.ID+":7948"
		}
	}
}

func nodes(ts ...gossip.Tag) map[string]gossip.Tag {
	m := map[string]gossip.Tag{}
	for _, t := range ts {
		m[t.ID] = t
	}
	return m
}

func ids() func(string) string {
	n := 0
	return func(dep string) string { n++; return fmt.Sprintf("%s-%d", dep, n) }
}

func snap(deps []Deployment, groups []*store.Group, ns map[string]gossip.Tag, mods ...func(*Snapshot)) Snapshot {
	s := Snapshot{Now: t0.Add(time.Hour), Deployments: deps, Groups: groups, Nodes: ns, Absent: map[string]time.Time{},
		Heads: map[string]HeadView{}, NewID: ids()}
	for _, m := range mods {
		m(&s)
	}
	return s
}

func serving(g *store.Group, head string) func(*Snapshot) {
	return func(s *Snapshot) {
		s.Heads[g.ID] = HeadView{Node: head, Epoch: g.Epoch, Term: 1, Connected: true, Serving: true}
	}
}

func absent(id string, for_ time.Duration) func(*Snapshot) {
	return func(s *Snapshot) { s.Absent[id] = s.Now.Add(-for_) }
}

func members(g *store.Group) string {
	var out []string
	for _, m := range g.Members {
		out = append(out, m.NodeID)
	}
	return fmt.Sprint(out)
}

func assigned(p *Plan) []string {
	var out []string
	for _, a := range p.Assign {
		out = append(out, fmt.Sprintf("%s→%s@%d", a.Node, a.Group.ID, a.Group.Epoch))
	}
	sort.Strings(out)
	return out
}

func events(p *Plan) []string {
	var out []string
	for _, e := range p.Events {
		out = append(out, e.Msg)
	}
	return out
}

// A ready deployment: g1 on n1+n2 (head n1), g2 on n3+n4 (head n3), spare n5.
func ready() ([]*store.Group, map[string]gossip.Tag, []func(*Snapshot)) {
	g1, g2 := grp("demo-a", 1, 0, "n1", "n2"), grp("demo-b", 1, 1, "n3", "n4")
	ns := nodes(agent("n1", in(g1, gossip.EngineReady, true)), agent("n2", in(g1, gossip.EngineRunning, false)),
		agent("n3", in(g2, gossip.EngineReady, true)), agent("n4", in(g2, gossip.EngineRunning, false)), agent("n5"))
	return []*store.Group{g1, g2}, ns, []func(*Snapshot){serving(g1, "n1"), serving(g2, "n3")}
}

func TestComputePlacesAndDelivers(t *testing.T) {
	p := Compute(snap([]Deployment{demo(2)}, nil, nodes(agent("n1"), agent("n2"), agent("n3"), agent("n4"), agent("n5", func(t *gossip.Tag) { t.GPUs = 4 }))))
	require.Len(t, p.Put, 2)
	require.Equal(t, "[n1 n2]", members(p.Put[0]))
	require.Equal(t, "[n3 n4]", members(p.Put[1]))
	require.Equal(t, uint64(1), p.Put[0].Epoch)
	require.Equal(t, []string{"n1→demo-1@1", "n2→demo-1@1", "n3→demo-2@1", "n4→demo-2@1"}, assigned(p),
		"every member of a new group hears of it, after the group is stored (Put)")
	require.Empty(t, p.Short)
	require.Equal(t, []string{"placed replica demo-1 on n1, n2", "placed replica demo-2 on n3, n4"}, events(p))
}

func TestComputeCannotPlace(t *testing.T) {
	p := Compute(snap([]Deployment{demo(1)}, nil, nodes(agent("n1"), agent("n2", func(t *gossip.Tag) { t.Healthy = false }))))
	require.Empty(t, p.Put)
	require.Equal(t, "cannot place a replica: needs 2 idle healthy node(s) with 8×H200 GPUs, 1 available; add nodes or lower replicas", p.Short["demo"])
}

func TestComputeSteadyStateDoesNothing(t *testing.T) {
	gs, ns, mods := ready()
	p := Compute(snap([]Deployment{demo(2)}, gs, ns, mods...))
	require.Empty(t, p.Put)
	require.Empty(t, p.Assign)
	require.Empty(t, p.Release)
	require.Empty(t, p.Delete)
	require.Empty(t, p.Events)
	require.Len(t, p.Heads, 2)
	require.Equal(t, router.HeadInfo{Deployment: "demo", Addr: "n1:7948", Complete: true}, p.Heads[router.HeadKey{Node: "n1", Group: "demo-a", Epoch: 1, Term: 1}])
}

func TestComputeDeliversLaggingAndReleasesStrays(t *testing.T) {
	gs, ns, mods := ready()
	n2 := ns["n2"]
	n2.Group, n2.Epoch = "", 0 // n2 lost its assignment (a fresh state dir)
	ns["n2"] = n2
	ns["n5"] = agent("n5", func(t *gossip.Tag) { t.Group, t.Epoch = "demo-gone", 3 })
	p := Compute(snap([]Deployment{demo(2)}, gs, ns, mods...))
	require.Equal(t, []string{"n2→demo-a@1"}, assigned(p))
	require.Equal(t, []Release{{Node: "n5", Addr: "n5:7947", Group: "demo-gone", Epoch: 3}}, p.Release)
	require.False(t, p.Heads[router.HeadKey{Node: "n1", Group: "demo-a", Epoch: 1, Term: 1}].Complete, "a member off its epoch leaves the replica incomplete")
}

func TestComputeDeletedDeployment(t *testing.T) {
	gs, ns, mods := ready()
	p := Compute(snap(nil, gs, ns, mods...))
	require.Len(t, p.Delete, 2)
	require.Equal(t, "deployment deleted", p.Delete[0].Why)
	require.Empty(t, p.Heads)
	require.Len(t, p.Release, 4, "every member is released (their groups are gone)")
}

func TestComputeReform(t *testing.T) {
	cases := []struct {
		name   string
		change func(ns map[string]gossip.Tag, s *Snapshot)
		// reformed is the new member list of demo-a ("" when it is not re-formed).
		reformed string
		event    string
	}{
		{"a member says it is unhealthy", func(ns map[string]gossip.Tag, s *Snapshot) {
			n2 := ns["n2"]
			n2.Healthy = false
			ns["n2"] = n2
		}, "[n1 n5]", "replica demo-a re-formed at epoch 2: replaced n2 (unhealthy) with n5"},
		{"a member is gone and its head reports the group failed", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n2")
			s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Failed: true, Reason: "member n2 unreachable for 3s"}
		}, "[n1 n5]", "replica demo-a re-formed at epoch 2: replaced n2 (gone from gossip; its head n1 reports: member n2 unreachable for 3s) with n5"},
		{"the head is gone and the worker reports its engine failed", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n1")
			delete(s.Heads, "demo-a")
			n2 := ns["n2"]
			n2.Engine = gossip.EngineFailed
			ns["n2"] = n2
		}, "[n2 n5]", "replica demo-a re-formed at epoch 2: replaced n1 (gone from gossip; member n2 reports its engine failed) with n5"},
		{"a member is gone and no member in sight runs an engine", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n1")
			delete(s.Heads, "demo-a")
			n2 := ns["n2"]
			n2.Engine = gossip.EngineIdle
			ns["n2"] = n2
		}, "[n2 n5]", ""},
		{"a member missing from the coordinator's view while its head serves is not gone", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n2")
			s.Absent["n2"] = s.Now.Add(-20 * time.Second)
		}, "", ""},
		{"a missing head whose worker still runs is not gone", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n1")
			s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: false, Serving: true}
			s.Absent["n1"] = s.Now.Add(-20 * time.Second)
		}, "", ""},
		{"with no word from the group, a short absence is not gone", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n1")
			delete(ns, "n2")
			delete(s.Heads, "demo-a")
			s.Absent["n1"], s.Absent["n2"] = s.Now.Add(-20*time.Second), s.Now.Add(-20*time.Second)
		}, "", ""},
		{"with no word from the group, a long absence is gone", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n2")
			n1 := ns["n1"]
			n1.Group = "" // out of sight of the group too: n1 restarted with a fresh state dir
			ns["n1"] = n1
			delete(s.Heads, "demo-a")
			s.Absent["n2"] = s.Now.Add(-LongAbsence)
		}, "[n1 n5]", "replica demo-a re-formed at epoch 2: replaced n2 (gone from gossip for 30s) with n5"},
		{"a just-started coordinator takes nobody it has not heard from for gone", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n2")
			s.Started = s.Now.Add(-10 * time.Second)
			s.Absent["n2"] = s.Started // not seen since the start
			s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Failed: true, Reason: "x"}
		}, "", ""},
		{"a just-started coordinator acts on a member it saw vanish", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n2")
			s.Started = s.Now.Add(-10 * time.Second)
			s.Absent["n2"] = s.Now.Add(-2 * time.Second)
			s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Failed: true, Reason: "member n2 unreachable for 3s"}
		}, "[n1 n5]", ""},
		{"while the guard holds, nothing is re-formed", func(ns map[string]gossip.Tag, s *Snapshot) {
			delete(ns, "n2")
			s.Hold = true
			s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Failed: true, Reason: "x"}
		}, "", ""},
		{"no spare: wait, and say so", func(ns map[string]gossip.Tag, s *Snapshot) {
			n2 := ns["n2"]
			n2.Healthy = false
			ns["n2"] = n2
			delete(ns, "n5")
		}, "", "replica demo-a lost n2 (unhealthy); waiting for 1 spare node(s) that fit (8×H200 GPUs)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			gs, ns, mods := ready()
			s := snap([]Deployment{demo(2)}, gs, ns, mods...)
			c.change(ns, &s)
			p := Compute(s)
			var put *store.Group
			for _, g := range p.Put {
				if g.ID == "demo-a" {
					put = g
				}
			}
			if c.reformed == "" {
				require.Nil(t, put, "demo-a must not be re-formed")
			} else {
				require.NotNil(t, put, "demo-a must be re-formed")
				require.Equal(t, c.reformed, members(put))
				require.Equal(t, uint64(2), put.Epoch, "a new epoch, stored before anyone hears of it")
				require.Equal(t, []int{0, 1}, []int{put.Members[0].Rank, put.Members[1].Rank})
				require.Contains(t, assigned(p), "n5→demo-a@2")
				require.Equal(t, []string{"demo"}, p.Reformed)
			}
			if c.event != "" {
				require.Contains(t, events(p), c.event)
			}
			for _, g := range p.Put {
				require.NotEqual(t, "demo-b", g.ID, "the other replica is untouched")
			}
		})
	}
}

func TestComputeScaleIn(t *testing.T) {
	gs, ns, mods := ready()
	s := snap([]Deployment{demo(1)}, gs, ns, mods...)
	s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Serving: false} // demo-a is not serving
	p := Compute(s)
	require.Len(t, p.Put, 1)
	require.Equal(t, "demo-a", p.Put[0].ID, "the replica that does not serve is drained first")
	require.Equal(t, s.Now, p.Put[0].DrainingSince)
	require.Equal(t, "scaled in", p.Put[0].DrainWhy)
	require.Equal(t, []string{"draining replica demo-a: scaled in"}, events(p))
	require.True(t, p.Heads[router.HeadKey{Node: "n1", Group: "demo-a", Epoch: 1, Term: 1}].Draining, "the built-in router stops sending to it")
	require.Equal(t, []Call{{Node: "n1", Addr: "n1:7947", Group: "demo-a", Epoch: 1}, {Node: "n2", Addr: "n2:7947", Group: "demo-a", Epoch: 1}}, p.Drain,
		"its members are told (once the drain is stored), so that every router hears it from the head")

	// Next pass: the drain is stored; members whose tag lacks it are asked again.
	gs[0] = p.Put[0]
	s = snap([]Deployment{demo(1)}, gs, ns, mods...)
	s.Now = p.Put[0].DrainingSince.Add(time.Second)
	p = Compute(s)
	require.Empty(t, p.Put)
	require.Equal(t, []Call{{Node: "n1", Addr: "n1:7947", Group: "demo-a", Epoch: 1}, {Node: "n2", Addr: "n2:7947", Group: "demo-a", Epoch: 1}}, p.Drain)
	require.Empty(t, p.Delete, "requests still run")
	require.Empty(t, p.Release)
}

func TestComputeDrainEnds(t *testing.T) {
	since := t0.Add(time.Hour)
	cases := []struct {
		name string
		head *HeadView
		took time.Duration
		done bool
	}{
		{"requests still run", &HeadView{Node: "n1", Epoch: 1, Connected: true, At: since.Add(5 * time.Second)}, 5 * time.Second, false},
		{"idle, measured after the drain began", &HeadView{Node: "n1", Epoch: 1, Connected: true, Idle: true, At: since.Add(2 * time.Second)}, 3 * time.Second, true},
		{"a prefill engine idle, but holding KV for decode engines", &HeadView{Node: "n1", Epoch: 1, Connected: true, Idle: true, HoldsKV: true, At: since.Add(2 * time.Second)}, 3 * time.Second, false},
		{"a prefill engine holding KV past the drain timeout", &HeadView{Node: "n1", Epoch: 1, Connected: true, Idle: true, HoldsKV: true, At: since.Add(2 * time.Second)}, DrainTimeout + time.Second, true},
		{"idle, but measured before the drain began", &HeadView{Node: "n1", Epoch: 1, Connected: true, Idle: true, At: since}, 3 * time.Second, false},
		{"unseen head, within the grace", nil, 4 * time.Second, false},
		{"unseen head, past the grace", nil, 6 * time.Second, true},
		{"the drain timed out", &HeadView{Node: "n1", Epoch: 1, Connected: true}, DrainTimeout + time.Second, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			gs, ns, mods := ready()
			gs[0].DrainingSince, gs[0].DrainWhy = since, "scaled in"
			s := snap([]Deployment{demo(1)}, gs, ns, mods...)
			s.Now = since.Add(c.took)
			delete(s.Heads, "demo-a")
			if c.head != nil {
				s.Heads["demo-a"] = *c.head
			}
			p := Compute(s)
			if !c.done {
				require.Empty(t, p.Delete)
				return
			}
			require.Equal(t, []Delete{{Group: gs[0], Why: "scaled in (drained)"}}, p.Delete)
			require.Contains(t, events(p)[0], "SuccessfulRescale: released replica demo-a after")
			require.Len(t, p.Release, 2, "its members are released with it")
		})
	}
}

func TestComputeHoldsDrainsWhileIsolated(t *testing.T) {
	gs, _, _ := ready()
	gs[0].DrainingSince, gs[0].DrainWhy = t0.Add(time.Hour), "scaled in"
	s := snap([]Deployment{demo(1)}, gs, map[string]gossip.Tag{}, func(s *Snapshot) {
		s.Hold, s.Now = true, gs[0].DrainingSince.Add(time.Minute) // far past the unseen grace
	})
	require.Empty(t, Compute(s).Delete, "a head out of sight of an isolated coordinator may still run requests")
}

func TestComputeDrainingGroupIsNeverReformedOrReassigned(t *testing.T) {
	gs, ns, mods := ready()
	gs[0].DrainingSince = t0.Add(time.Hour)
	n2 := ns["n2"]
	n2.Healthy, n2.Group = false, ""
	ns["n2"] = n2
	p := Compute(snap([]Deployment{demo(1)}, gs, ns, mods...))
	require.Empty(t, p.Put)
	require.Empty(t, p.Assign)
}

func TestComputeHoldsScaling(t *testing.T) {
	gs, ns, mods := ready()
	mods = append(mods, func(s *Snapshot) { s.Hold = true })
	require.Empty(t, Compute(snap([]Deployment{demo(3)}, gs, ns, mods...)).Put, "no scale-out while isolated")
	require.Empty(t, Compute(snap([]Deployment{demo(1)}, gs, ns, mods...)).Put, "no scale-in while isolated")
}

// TestIsolation is the reconciler's decision in the three situations of a
// coordinator cut off from its cluster: guard and plan together.
func TestIsolation(t *testing.T) {
	known := 5
	t.Run("mass disappearance: the coordinator sees nobody and re-forms nothing", func(t *testing.T) {
		var g Guard
		now := t0
		g = g.Next(now, known, 5)
		require.False(t, g.Holding)
		now = now.Add(time.Second)
		g = g.Next(now, known, 0) // cut off: everyone vanished at once
		require.True(t, g.Holding)
		require.Contains(t, g.Reason, "lost sight of 5 of 5 agents at once")
		gs, _, _ := ready()
		s := snap([]Deployment{demo(2)}, gs, map[string]gossip.Tag{}, func(s *Snapshot) {
			s.Hold, s.Now = g.Holding, now
			for _, id := range []string{"n1", "n2", "n3", "n4", "n5"} {
				s.Absent[id] = now.Add(-time.Minute)
			}
		})
		p := Compute(s)
		require.Empty(t, p.Put, "nothing re-formed or placed on a view of nobody")
		require.Empty(t, p.Delete)
	})
	t.Run("stale death after a heal: a member still marked dead counts for nothing", func(t *testing.T) {
		var g Guard
		now := t0
		g = g.Next(now, known, 5)
		now = now.Add(time.Second)
		g = g.Next(now, known, 0)
		now = now.Add(10 * time.Second)
		g = g.Next(now, known, 4) // healed; a stale "dead" notice still hides n2
		require.True(t, g.Holding, "the hold outlives the heal")
		require.Equal(t, now.Add(HoldAfterHeal), g.Until)
		gs, ns, mods := ready()
		delete(ns, "n2")
		p := Compute(snap([]Deployment{demo(2)}, gs, ns, append(mods, func(s *Snapshot) { s.Hold, s.Now = g.Holding, now; s.Absent["n2"] = now.Add(-11 * time.Second) })...))
		require.Empty(t, p.Put)
		// The hold ends; n2 is still hidden, but its group says it serves.
		now = g.Until
		g = g.Next(now, known, 4)
		require.False(t, g.Holding)
		p = Compute(snap([]Deployment{demo(2)}, gs, ns, append(mods, func(s *Snapshot) { s.Now = now; s.Absent["n2"] = now.Add(-26 * time.Second) })...))
		require.Empty(t, p.Put, "the group's head serves: its member is not gone")
	})
	t.Run("a real single-host death during a partial partition", func(t *testing.T) {
		var g Guard
		now := t0
		g = g.Next(now, known, 5)
		now = now.Add(5 * time.Second)
		g = g.Next(now, known, 3) // n4 is cut off from the coordinator only; n2 died
		require.False(t, g.Holding, "two of five out of sight is no isolation: evidence decides")
		gs, ns, mods := ready()
		delete(ns, "n2")
		delete(ns, "n4")
		p := Compute(snap([]Deployment{demo(2)}, gs, ns, append(mods, func(s *Snapshot) {
			s.Now = now
			s.Absent["n2"], s.Absent["n4"] = now.Add(-4*time.Second), now.Add(-4*time.Second)
			s.Heads["demo-a"] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Failed: true, Reason: "member n2 unreachable for 3s"}
		})...))
		require.Len(t, p.Put, 1, "only the group whose head reports the loss is re-formed")
		require.Equal(t, "demo-a", p.Put[0].ID)
		require.Equal(t, "[n1 n5]", members(p.Put[0]))
	})
}

func TestGuard(t *testing.T) {
	cases := []struct {
		name  string
		known int
		steps []struct {
			after   time.Duration
			visible int
		}
		holding []bool
	}{
		{"one loss in five is a death, not an isolation", 5, []struct {
			after   time.Duration
			visible int
		}{{0, 5}, {time.Second, 4}, {time.Minute, 4}}, []bool{false, false, false}},
		{"half the cluster gone is an isolation until healed, then a while more", 6, []struct {
			after   time.Duration
			visible int
		}{{0, 6}, {time.Second, 2}, {20 * time.Second, 2}, {time.Second, 6}, {10 * time.Second, 6}, {6 * time.Second, 6}},
			[]bool{false, true, true, true, true, false}},
		{"a third lost at once holds, then the survivors' view is trusted", 9, []struct {
			after   time.Duration
			visible int
		}{{0, 9}, {time.Second, 6}, {5 * time.Second, 6}, {6 * time.Second, 6}, {16 * time.Second, 6}},
			[]bool{false, true, true, true, false}},
		{"two lost at once are two deaths", 6, []struct {
			after   time.Duration
			visible int
		}{{0, 6}, {time.Second, 4}}, []bool{false, false}},
		{"a small cluster never holds", 2, []struct {
			after   time.Duration
			visible int
		}{{0, 2}, {time.Second, 0}}, []bool{false, false}},
		{"a hold is bounded", 5, []struct {
			after   time.Duration
			visible int
		}{{0, 5}, {time.Second, 1}, {MaxHold, 1}, {time.Minute, 1}, {time.Second, 5}, {time.Second, 0}},
			[]bool{false, true, false, false, false, true}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var g Guard
			now := t0
			for i, st := range c.steps {
				now = now.Add(st.after)
				g = g.Next(now, c.known, st.visible)
				require.Equal(t, c.holding[i], g.Holding, "step %d (%d of %d visible): %s", i, st.visible, c.known, g.Reason)
			}
		})
	}
}

func TestGuardWake(t *testing.T) {
	var g Guard
	require.True(t, g.Wake().IsZero())
	g = g.Next(t0, 5, 5)
	g = g.Next(t0.Add(time.Second), 5, 0)
	require.Equal(t, t0.Add(time.Second+MaxHold), g.Wake())
	g = g.Next(t0.Add(2*time.Second), 5, 5)
	require.Equal(t, t0.Add(2*time.Second+HoldAfterHeal), g.Wake())
}

// rolled gives g the engine settings of d (as a group formed now has).
func rolled(g *store.Group, d Deployment) *store.Group { g.Spec = SpecHash(d.Spec); return g }

// TestRolloutSurgesThenDrains: with a spare node pair, a changed spec first
// places a new replica (count+1), drains an outdated one only once the new
// one serves, and so on one at a time; never fewer serving replicas than
// the count.
func TestRolloutSurgesThenDrains(t *testing.T) {
	old := demo(2)
	cur := demo(2)
	cur.Spec.Engine.Args = []string{"--max-num-seqs", "64"}
	g1, g2 := rolled(grp("demo-a", 1, 0, "n1", "n2"), old), rolled(grp("demo-b", 1, 1, "n3", "n4"), old)
	ns := nodes(agent("n1", in(g1, gossip.EngineReady, true)), agent("n2", in(g1, gossip.EngineRunning, false)),
		agent("n3", in(g2, gossip.EngineReady, true)), agent("n4", in(g2, gossip.EngineRunning, false)), agent("n5"), agent("n6"))
	require.True(t, Outdated(g1, cur.Spec))
	require.False(t, Outdated(g1, old.Spec))

	// Pass 1: surge.
	s := snap([]Deployment{cur}, []*store.Group{g1, g2}, ns, serving(g1, "n1"), serving(g2, "n3"))
	p := Compute(s)
	require.Len(t, p.Put, 1)
	ng := p.Put[0]
	require.False(t, Outdated(ng, cur.Spec), "the new replica has the new settings")
	require.Equal(t, "[n5 n6]", members(ng))
	require.Contains(t, events(p), "rolling out new engine settings: placed replica "+ng.ID+"; 2 replica(s) to replace")
	for _, a := range p.Assign {
		require.Equal(t, []string{"--max-num-seqs", "64"}, a.Spec.Engine.Args)
	}

	// Pass 2: the new one does not serve yet: nothing is drained.
	ns["n5"], ns["n6"] = agent("n5", in(ng, gossip.EngineLoading, true)), agent("n6", in(ng, gossip.EngineRunning, false))
	s = snap([]Deployment{cur}, []*store.Group{g1, g2, ng}, ns, serving(g1, "n1"), serving(g2, "n3"))
	p = Compute(s)
	require.Empty(t, p.Put, "no drain before the new replica serves")

	// Pass 3: it serves: the oldest outdated one drains ("rolled out").
	s = snap([]Deployment{cur}, []*store.Group{g1, g2, ng}, ns, serving(g1, "n1"), serving(g2, "n3"), serving(ng, "n5"))
	p = Compute(s)
	require.Len(t, p.Put, 1)
	require.True(t, p.Put[0].Draining())
	require.Equal(t, "rolled out", p.Put[0].DrainWhy)
	require.Contains(t, []string{"demo-a", "demo-b"}, p.Put[0].ID, "an outdated one, never the new one")

	// Pass 4: while that drain runs, the other outdated one is left alone
	// (two serve: the new one and the other old one).
	drained := p.Put[0]
	rest := g2
	if drained.ID == "demo-b" {
		rest = g1
	}
	s = snap([]Deployment{cur}, []*store.Group{drained, rest, ng}, ns, serving(g1, "n1"), serving(g2, "n3"), serving(ng, "n5"))
	s.Now = drained.DrainingSince.Add(time.Second)
	p = Compute(s)
	for _, g := range p.Put {
		require.NotEqual(t, rest.ID, g.ID, "one step at a time: %s", events(p))
	}
}

// TestRolloutWithoutRoomDrainsFirst: no spare nodes: one outdated replica
// drains, and only one at a time.
func TestRolloutWithoutRoomDrainsFirst(t *testing.T) {
	old := demo(2)
	cur := demo(2)
	cur.Spec.Model.Source = "/models/demo-v2"
	g1, g2 := rolled(grp("demo-a", 1, 0, "n1", "n2"), old), rolled(grp("demo-b", 1, 1, "n3", "n4"), old)
	ns := nodes(agent("n1", in(g1, gossip.EngineReady, true)), agent("n2", in(g1, gossip.EngineRunning, false)),
		agent("n3", in(g2, gossip.EngineReady, true)), agent("n4", in(g2, gossip.EngineRunning, false)))
	s := snap([]Deployment{cur}, []*store.Group{g1, g2}, ns, serving(g1, "n1"), serving(g2, "n3"))
	p := Compute(s)
	require.Len(t, p.Put, 1)
	d := p.Put[0]
	require.Equal(t, "rolled out (no room to surge)", d.DrainWhy)
	require.Empty(t, p.Short, "waiting for room is not a shortage")

	// While it drains (and its nodes are busy), the other is left alone.
	s = snap([]Deployment{cur}, []*store.Group{d, g2}, ns, serving(g1, "n1"), serving(g2, "n3"))
	s.Now = d.DrainingSince.Add(time.Second)
	s.Heads[d.ID] = HeadView{Node: "n1", Epoch: 1, Term: 1, Connected: true, Serving: true}
	p = Compute(s)
	for _, g := range p.Put {
		require.NotEqual(t, "demo-b", g.ID, "one at a time")
	}
}

// TestRolloutLeavesCurrentAndUnknownGroupsAlone: groups formed with the
// current settings, and groups stored before rollouts existed (no Spec),
// are not replaced; replica-count changes replace nothing.
func TestRolloutLeavesCurrentAndUnknownGroupsAlone(t *testing.T) {
	gs, ns, mods := ready()
	d := demo(2)
	require.Empty(t, Compute(snap([]Deployment{d}, gs, ns, mods...)).Put, "no Spec: taken as current")
	for _, g := range gs {
		rolled(g, d)
	}
	d.Spec.Labels = map[string]string{"team": "a"}
	d.Spec.Autoscaling = &spec.Autoscaling{Policy: "kpa"}
	require.Empty(t, Compute(snap([]Deployment{d}, gs, ns, mods...)).Put, "labels and autoscaling are not engine settings")
	require.Equal(t, SpecHash(demo(2).Spec), SpecHash(d.Spec))
}

// TestRolloutStallsOnABrokenNewSpec: a new replica that never serves (bad
// arguments) stops the rollout: the old replicas keep serving.
func TestRolloutStallsOnABrokenNewSpec(t *testing.T) {
	old, cur := demo(1), demo(1)
	cur.Spec.Engine.Args = []string{"--bogus"}
	g1 := rolled(grp("demo-a", 1, 0, "n1", "n2"), old)
	ng := rolled(grp("demo-n", 1, 5, "n3", "n4"), cur)
	ns := nodes(agent("n1", in(g1, gossip.EngineReady, true)), agent("n2", in(g1, gossip.EngineRunning, false)),
		agent("n3", in(ng, gossip.EngineFailed, true)), agent("n4", in(ng, gossip.EngineRunning, false)))
	for i := 0; i < 5; i++ {
		s := snap([]Deployment{cur}, []*store.Group{g1, ng}, ns, serving(g1, "n1"))
		s.Now = s.Now.Add(time.Duration(i) * time.Minute)
		p := Compute(s)
		for _, g := range p.Put {
			require.False(t, g.ID == "demo-a" && g.Draining(), "the serving old replica is never drained for a new one that does not serve")
		}
	}
}
