package agent

import (
	"fmt"
	"math/rand"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
)

var t0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

var testPolicy = Policy{RestartBackoff: 5 * time.Second, StopGrace: 30 * time.Second}

// group3 is the assignment of the election tests' group: a, b, c at ranks 0-2.
func group3() *Assignment {
	return &Assignment{Deployment: "d", Group: "g", Epoch: 1, Members: []Member{{NodeID: "a"}, {NodeID: "b", Rank: 1}, {NodeID: "c", Rank: 2}}}
}

func follows(head string, term uint64) func(*gossip.Tag) {
	return func(t *gossip.Tag) { t.Follow, t.FollowTerm = head, term }
}

func claims(term uint64, es string) func(*gossip.Tag) {
	return func(t *gossip.Tag) { t.HeadTerm, t.Follow, t.FollowTerm, t.Engine = term, t.ID, term, es }
}

func engineState(es string) func(*gossip.Tag) { return func(t *gossip.Tag) { t.Engine = es } }

func both(fs ...func(*gossip.Tag)) func(*gossip.Tag) {
	return func(t *gossip.Tag) {
		for _, f := range fs {
			f(t)
		}
	}
}

// headOf is a's input as head at term 4 of a whole group following it.
func headOf(run *RunInfo, mods ...func(*Input)) Input {
	in := Input{Now: t0, Self: "a", Joined: true, Policy: testPolicy, Run: run,
		Local: Local{As: group3(), Claim: 4, Follow: "a", FTerm: 4, ES: gossip.EngineWaiting, LastTerm: 4, Backoff: 5 * time.Second},
		View:  view("a", member("a", claims(4, gossip.EngineWaiting)), member("b", follows("a", 4)), member("c", follows("a", 4)))}
	for _, m := range mods {
		m(&in)
	}
	return in
}

// workerOf is b's input, following a at term 4.
func workerOf(run *RunInfo, mods ...func(*Input)) Input {
	in := Input{Now: t0, Self: "b", Joined: true, Policy: testPolicy, Run: run,
		Local: Local{As: group3(), Follow: "a", FTerm: 4, ES: gossip.EngineIdle, LastTerm: 2, Backoff: 5 * time.Second},
		View:  view("b", member("a", claims(4, gossip.EngineRunning)), member("b", follows("a", 4)), member("c", follows("a", 4)))}
	for _, m := range mods {
		m(&in)
	}
	return in
}

func headRun(phase string) *RunInfo {
	return &RunInfo{Group: "g", Epoch: 1, Term: 4, Head: "a", Role: engine.RoleHead, Phase: phase}
}

func workerRun(phase string) *RunInfo {
	return &RunInfo{Group: "g", Epoch: 1, Term: 4, Head: "a", Role: engine.RoleWorker, Phase: phase}
}

func withTag(id string, mod func(*gossip.Tag)) func(*Input) {
	return func(in *Input) {
		t := in.View.Tags[id]
		mod(&t)
		in.View.Tags[id] = t
	}
}

func without(id string) func(*Input) { return func(in *Input) { delete(in.View.Tags, id) } }

func TestDecide(t *testing.T) {
	type want struct {
		act    ActionKind
		why    string // Act.Why, for stops
		fail   bool
		grace  time.Duration
		role   engine.Role
		term   uint64
		claim  uint64
		follow string
		fterm  uint64
		es     string
		wake   time.Time
		note   string
	}
	stopGrace, failGrace := testPolicy.StopGrace, failStopGrace
	cases := []struct {
		name string
		in   Input
		want want
		// check looks at what want does not cover.
		check func(t *testing.T, out Output)
	}{
		{name: "no assignment, no run: nothing to do",
			in:   Input{Now: t0, Self: "a", Policy: testPolicy},
			want: want{}},
		{name: "released with a run: a planned stop keeps the stop grace",
			in:   Input{Now: t0, Self: "b", Policy: testPolicy, Run: workerRun(gossip.EngineRunning)},
			want: want{act: ActStop, why: "released", grace: stopGrace}},
		{name: "a run of an older epoch is stopped before the new epoch starts",
			in: workerOf(&RunInfo{Group: "g", Epoch: 0, Term: 3, Head: "a", Role: engine.RoleWorker, Phase: gossip.EngineRunning},
				func(in *Input) { in.Local.Follow, in.Local.FTerm = "", 0 }),
			want: want{act: ActStop, why: "new assignment", grace: stopGrace}},
		{name: "while a run stops nothing changes, whatever gossip says",
			in: workerOf(&RunInfo{Group: "g", Epoch: 1, Term: 4, Head: "a", Role: engine.RoleWorker, Stopping: true},
				withTag("a", claims(9, gossip.EngineWaiting))),
			want: want{follow: "a", fterm: 4}},
		{name: "an unhealthy node fails its run at once, saying why",
			in:   headOf(headRun(gossip.EngineReady), func(in *Input) { in.Unhealthy = "GPU 3: Xid 79" }),
			want: want{act: ActStop, why: "node unhealthy: GPU 3: Xid 79", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed},
			check: func(t *testing.T, out Output) {
				require.Equal(t, t0.Add(5*time.Second), out.Local.BackoffUntil)
				require.Equal(t, 10*time.Second, out.Local.Backoff, "the backoff doubles")
			}},
		{name: "an adopted run holds until gossip joined",
			in: headOf(headRun(gossip.EngineLoading), func(in *Input) {
				in.Joined = false
				in.Local.HoldUntil = t0.Add(15 * time.Second)
				delete(in.View.Tags, "b")
			}),
			want: want{claim: 4, follow: "a", fterm: 4, es: gossip.EngineWaiting, wake: t0.Add(15 * time.Second)}},
		{name: "the hold ends once gossip shows the whole group",
			in:    headOf(headRun(gossip.EngineLoading), func(in *Input) { in.Local.HoldUntil = t0.Add(15 * time.Second) }),
			want:  want{claim: 4, follow: "a", fterm: 4, es: gossip.EngineLoading},
			check: func(t *testing.T, out Output) { require.True(t, out.Local.HoldUntil.IsZero()) }},
		{name: "an expired hold judges the group as it is, with a warning",
			in: headOf(headRun(gossip.EngineLoading), func(in *Input) {
				in.Local.HoldUntil = t0.Add(-time.Second)
				delete(in.View.Tags, "b")
			}),
			want: want{act: ActStop, why: "group incomplete", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed}},

		// A head.
		{name: "head, group incomplete, run: fail it and keep the claim until it stopped",
			in:   headOf(headRun(gossip.EngineReady), without("c")),
			want: want{act: ActStop, why: "group incomplete", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "head, group incomplete, no run: give the claim up",
			in:   headOf(nil, without("c")),
			want: want{es: gossip.EngineIdle, note: "gave up head claim"}},
		{name: "head, a member with a higher claim is the candidate: give the claim up",
			in:   headOf(nil, withTag("b", claims(7, gossip.EngineWaiting))),
			want: want{es: gossip.EngineIdle, note: "gave up head claim"}},
		{name: "head whose engine failed gives the claim up; the failure stays advertised",
			in:   headOf(nil, func(in *Input) { in.Local.ES = gossip.EngineFailed }),
			want: want{es: gossip.EngineFailed, note: "gave up head claim"}},
		{name: "head waits until every member follows it",
			in:   headOf(nil, withTag("c", follows("", 0))),
			want: want{claim: 4, follow: "a", fterm: 4, es: gossip.EngineWaiting}},
		{name: "head starts its engine once all follow",
			in:   headOf(nil),
			want: want{act: ActStart, role: engine.RoleHead, term: 4, claim: 4, follow: "a", fterm: 4, es: gossip.EngineStarting}},
		{name: "head whose run failed fails the group",
			in:   headOf(&RunInfo{Group: "g", Epoch: 1, Term: 4, Head: "a", Role: engine.RoleHead, Phase: gossip.EngineLoading, Failed: "vllm exited (exit status 1)"}),
			want: want{act: ActStop, why: "vllm exited (exit status 1)", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "head fails when a member reports its engine failed",
			in:   headOf(headRun(gossip.EngineReady), withTag("c", engineState(gossip.EngineFailed))),
			want: want{act: ActStop, why: "member c reports its engine failed", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "head fails when a member stops following it",
			in:   headOf(headRun(gossip.EngineReady), withTag("b", follows("", 0))),
			want: want{act: ActStop, why: "a member stopped following this head", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "head advertises its run's phase",
			in:   headOf(headRun(gossip.EngineLoading)),
			want: want{claim: 4, follow: "a", fterm: 4, es: gossip.EngineLoading}},
		{name: "head ready for the first time: the backoff resets after a minute of serving",
			in:    headOf(headRun(gossip.EngineReady)),
			want:  want{claim: 4, follow: "a", fterm: 4, es: gossip.EngineReady, wake: t0.Add(readyResetAfter)},
			check: func(t *testing.T, out Output) { require.Equal(t, t0, out.Local.ReadySince) }},
		{name: "head ready for a minute: the next failure backs off from the start again",
			in: headOf(headRun(gossip.EngineReady), func(in *Input) {
				in.Local.ReadySince, in.Local.Backoff = t0.Add(-readyResetAfter), 80*time.Second
			}),
			want:  want{claim: 4, follow: "a", fterm: 4, es: gossip.EngineReady},
			check: func(t *testing.T, out Output) { require.Equal(t, 5*time.Second, out.Local.Backoff) }},
		{name: "the backoff is capped",
			in:   headOf(headRun(gossip.EngineReady), without("b"), func(in *Input) { in.Local.Backoff = 4 * time.Minute }),
			want: want{act: ActStop, why: "group incomplete", fail: true, grace: failGrace, claim: 4, follow: "a", fterm: 4, es: gossip.EngineFailed},
			check: func(t *testing.T, out Output) {
				require.Equal(t, maxBackoff, out.Local.Backoff)
				require.Equal(t, t0.Add(4*time.Minute), out.Local.BackoffUntil)
			}},

		// A member that is the candidate.
		{name: "candidate in backoff waits for its end",
			in: Input{Now: t0, Self: "a", Joined: true, Policy: testPolicy,
				Local: Local{As: group3(), ES: gossip.EngineFailed, LastTerm: 4, BackoffUntil: t0.Add(3 * time.Second)},
				View:  view("a", member("a", nil), member("b", nil), member("c", nil))},
			want: want{es: gossip.EngineFailed, wake: t0.Add(3 * time.Second)}},
		{name: "candidate claims a term above every term seen and its own last",
			in: Input{Now: t0, Self: "a", Joined: true, Policy: testPolicy,
				Local: Local{As: group3(), LastTerm: 4},
				View:  view("a", member("a", nil), member("b", follows("x", 6)), member("c", nil))},
			want: want{claim: 7, follow: "a", fterm: 7, es: gossip.EngineWaiting, note: "claimed head"},
			check: func(t *testing.T, out Output) {
				require.True(t, out.Claimed)
				require.Equal(t, uint64(7), out.Local.LastTerm, "the term is persisted")
			}},
		{name: "candidate with a run stops it first, without a new backoff",
			in: workerOf(workerRun(gossip.EngineRunning), func(in *Input) {
				in.Self = "a"
				in.Local.Follow, in.Local.FTerm = "x", 3
				in.View = view("a", member("a", follows("x", 3)), member("b", nil), member("c", nil))
			}),
			want:  want{act: ActStop, why: "becoming head", fail: true, grace: failGrace, follow: "x", fterm: 3, es: gossip.EngineFailed},
			check: func(t *testing.T, out Output) { require.True(t, out.Local.BackoffUntil.IsZero()) }},

		// A member.
		{name: "member: the candidate claims nothing yet, so nothing is followed",
			in:   workerOf(nil, withTag("a", claims(0, ""))),
			want: want{es: gossip.EngineIdle}},
		{name: "member: no head and a run: fail it, keep following until it stopped",
			in:   workerOf(workerRun(gossip.EngineRunning), without("c")),
			want: want{act: ActStop, why: "no head", fail: true, grace: failGrace, follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "member: no head keeps a failure advertised",
			in:   workerOf(nil, without("c"), func(in *Input) { in.Local.ES = gossip.EngineFailed }),
			want: want{es: gossip.EngineFailed}},
		{name: "member follows a new head",
			in:   workerOf(nil, withTag("a", claims(5, gossip.EngineWaiting))),
			want: want{follow: "a", fterm: 5, es: gossip.EngineIdle, note: "following head"}},
		{name: "member with a run never follows a new head before the run stopped",
			in:   workerOf(workerRun(gossip.EngineRunning), withTag("a", claims(5, gossip.EngineWaiting))),
			want: want{act: ActStop, why: "following a new head", fail: true, grace: failGrace, follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "member starts its worker once the head's node runs",
			in:   workerOf(nil),
			want: want{act: ActStart, role: engine.RoleWorker, term: 4, follow: "a", fterm: 4, es: gossip.EngineStarting}},
		{name: "member pulls its weights while the head pulls its own",
			in:   workerOf(nil, withTag("a", engineState(gossip.EngineDownloading))),
			want: want{act: ActStart, role: engine.RoleWorker, term: 4, follow: "a", fterm: 4, es: gossip.EngineStarting}},
		{name: "member waits while the head is still starting",
			in:   workerOf(nil, withTag("a", engineState(gossip.EngineStarting))),
			want: want{follow: "a", fterm: 4, es: gossip.EngineIdle}},
		{name: "member whose engine failed at this term waits for the head's next claim",
			in:   workerOf(nil, func(in *Input) { in.Local.FailedTerm, in.Local.ES = 4, gossip.EngineFailed }),
			want: want{follow: "a", fterm: 4, es: gossip.EngineFailed}},
		{name: "member whose run failed fails it and remembers the term",
			in:    workerOf(&RunInfo{Group: "g", Epoch: 1, Term: 4, Head: "a", Role: engine.RoleWorker, Phase: gossip.EngineRunning, Failed: "ray exited"}),
			want:  want{act: ActStop, why: "ray exited", fail: true, grace: failGrace, follow: "a", fterm: 4, es: gossip.EngineFailed},
			check: func(t *testing.T, out Output) { require.Equal(t, uint64(4), out.Local.FailedTerm) }},
		{name: "member stops (planned) when its head's engine failed",
			in:   workerOf(workerRun(gossip.EngineRunning), withTag("a", engineState(gossip.EngineFailed))),
			want: want{act: ActStop, why: "head engine failed", grace: stopGrace, follow: "a", fterm: 4, es: gossip.EngineIdle}},
		{name: "member advertises its run's phase",
			in:   workerOf(workerRun(gossip.EngineRunning)),
			want: want{follow: "a", fterm: 4, es: gossip.EngineRunning}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := Decide(c.in)
			w := c.want
			require.Equal(t, w.act, out.Act.Kind, "action")
			switch w.act {
			case ActStop:
				require.Equal(t, w.why, out.Act.Why)
				require.Equal(t, w.fail, out.Act.Fail)
				require.Equal(t, w.grace, out.Act.Grace)
			case ActStart:
				require.Equal(t, w.role, out.Act.Role)
				require.Equal(t, w.term, out.Act.Term)
			}
			require.Equal(t, w.claim, out.Local.Claim, "claim")
			require.Equal(t, w.follow, out.Local.Follow, "follow")
			require.Equal(t, w.fterm, out.Local.FTerm, "follow term")
			require.Equal(t, w.es, out.Local.ES, "engine state")
			require.Equal(t, w.wake, out.Wake, "wake")
			if w.note != "" {
				require.Equal(t, w.note, out.Note)
			}
			if c.check != nil {
				c.check(t, out)
			}
		})
	}
}

// TestDecideNeverChangesClaimOrFollowUnderARun draws random inputs and
// checks the rules that keep GPUs and heads safe, whatever the input.
func TestDecideNeverChangesClaimOrFollowUnderARun(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	states := []string{gossip.EngineIdle, gossip.EngineWaiting, gossip.EngineStarting, gossip.EngineDownloading,
		gossip.EngineRunning, gossip.EngineLoading, gossip.EngineReady, gossip.EngineFailed}
	pick := func(l []string) string { return l[rng.Intn(len(l))] }
	ids := []string{"a", "b", "c"}
	for i := 0; i < 20000; i++ {
		self := ids[rng.Intn(3)]
		in := Input{Now: t0, Self: self, Joined: rng.Intn(4) > 0, Policy: testPolicy, Local: Local{As: group3(), ES: pick(states),
			LastTerm: uint64(rng.Intn(5)), Backoff: time.Duration(rng.Intn(10)) * time.Second}}
		if rng.Intn(2) == 0 {
			in.Local.Claim = uint64(1 + rng.Intn(5))
			in.Local.Follow, in.Local.FTerm = self, in.Local.Claim
		} else if rng.Intn(2) == 0 {
			in.Local.Follow, in.Local.FTerm = ids[rng.Intn(3)], uint64(rng.Intn(5))
		}
		if rng.Intn(3) == 0 {
			in.Local.BackoffUntil = t0.Add(time.Duration(rng.Intn(3)-1) * time.Second)
		}
		var tags []gossip.Tag
		for _, id := range ids {
			if rng.Intn(6) == 0 {
				continue // missing from gossip
			}
			tg := member(id, nil)
			tg.Healthy = rng.Intn(8) > 0
			if rng.Intn(3) == 0 {
				tg.HeadTerm = uint64(rng.Intn(6))
			}
			tg.Follow, tg.FollowTerm, tg.Engine = ids[rng.Intn(3)], uint64(rng.Intn(6)), pick(states)
			tags = append(tags, tg)
		}
		in.View = view(self, tags...)
		if rng.Intn(2) == 0 {
			role := engine.RoleWorker
			if in.Local.Claim > 0 {
				role = engine.RoleHead
			}
			in.Run = &RunInfo{Group: "g", Epoch: 1, Term: in.Local.FTerm, Head: in.Local.Follow, Role: role, Phase: pick(states), Stopping: rng.Intn(4) == 0}
			if rng.Intn(4) == 0 {
				in.Run.Failed = "boom"
			}
		}
		if rng.Intn(10) == 0 {
			in.Unhealthy = "GPU 0: Xid 79"
		}
		out := Decide(in)
		desc := fmt.Sprintf("case %d: %+v run=%+v → %+v", i, in.Local, in.Run, out)
		if in.Run != nil {
			require.NotEqual(t, ActStart, out.Act.Kind, "a second run on one node: %s", desc)
			require.Equal(t, in.Local.Claim, out.Local.Claim, "claim changed under a run: %s", desc)
			require.Equal(t, in.Local.Follow, out.Local.Follow, "follow changed under a run: %s", desc)
			require.Equal(t, in.Local.FTerm, out.Local.FTerm, "follow term changed under a run: %s", desc)
			if in.Run.Stopping {
				require.Equal(t, ActNone, out.Act.Kind, "acted on a stopping run: %s", desc)
			}
		} else {
			require.NotEqual(t, ActStop, out.Act.Kind, "stop without a run: %s", desc)
		}
		if out.Act.Kind == ActStart && out.Act.Role == engine.RoleHead {
			require.True(t, AllFollow(in.View, self, out.Local.Claim), "a head started without all members following: %s", desc)
		}
		if out.Local.Claim > in.Local.Claim && in.Local.Claim == 0 {
			require.Greater(t, out.Local.Claim, in.Local.LastTerm, "a new claim reuses a term: %s", desc)
			require.False(t, in.Now.Before(in.Local.BackoffUntil), "claimed during a backoff: %s", desc)
		}
	}
}

// node is one member in the group simulation below: its supervisor state
// and its run, with stops that take a few rounds.
type simNode struct {
	id      string
	loc     Local
	run     *RunInfo
	stopFor int // rounds until a stopping run is gone
	up      bool
}

func (n *simNode) tag() gossip.Tag {
	t := member(n.id, nil)
	t.HeadTerm, t.Follow, t.FollowTerm, t.Engine = n.loc.Claim, n.loc.Follow, n.loc.FTerm, n.loc.ES
	return t
}

// TestDecideGroupSimulation runs Decide on three members in lock-step
// rounds over a shared gossip view, with random faults (engine failures,
// lost gossip between members, slow stops), and checks on every round that
// no two heads run in the epoch and that a worker runs only joined to the
// one head; once the faults stop the group must converge to one ready head
// with every worker running.
func TestDecideGroupSimulation(t *testing.T) {
	for seed := int64(1); seed <= 40; seed++ {
		rng := rand.New(rand.NewSource(seed))
		nodes := map[string]*simNode{}
		ids := []string{"a", "b", "c"}
		for _, id := range ids {
			nodes[id] = &simNode{id: id, loc: Local{As: group3(), Backoff: time.Second}, up: true}
		}
		now := t0
		pol := Policy{RestartBackoff: time.Second, StopGrace: time.Second}
		converged := false
		for round := 0; round < 600; round++ {
			faulty := round < 300
			now = now.Add(500 * time.Millisecond)
			tags := map[string]gossip.Tag{}
			for _, id := range ids {
				tags[id] = nodes[id].tag()
			}
			order := append([]string(nil), ids...)
			rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			for _, id := range order {
				n := nodes[id]
				v := GroupView{Self: id, Group: "g", Epoch: 1, Members: map[string]int{"a": 0, "b": 1, "c": 2}, Tags: map[string]gossip.Tag{}}
				for _, o := range ids {
					if o != id && faulty && rng.Intn(20) == 0 {
						continue // a lost or stale gossip view of o
					}
					v.Tags[o] = tags[o]
				}
				v.Tags[id] = n.tag()
				if n.run != nil && n.run.Stopping {
					if n.stopFor--; n.stopFor <= 0 {
						n.run = nil
					}
				}
				out := Decide(Input{Now: now, Self: id, View: v, Local: n.loc, Run: n.run, Joined: true, Policy: pol})
				n.loc = out.Local
				switch out.Act.Kind {
				case ActStart:
					n.run = &RunInfo{Group: "g", Epoch: 1, Term: out.Act.Term, Head: out.Act.Head, Role: out.Act.Role, Phase: gossip.EngineRunning}
				case ActStop:
					n.run.Stopping = true
					n.stopFor = 1 + rng.Intn(4)
				}
				if r := n.run; r != nil && !r.Stopping {
					if r.Role == engine.RoleHead && r.Phase == gossip.EngineRunning {
						r.Phase = gossip.EngineReady
					}
					if faulty && rng.Intn(60) == 0 {
						r.Failed = "injected"
					}
				}
			}
			// Safety: at most one head's engine runs, and every running
			// worker is joined to that head at its term.
			var heads []string
			var head *RunInfo
			for _, id := range ids {
				if r := nodes[id].run; r != nil && r.Role == engine.RoleHead {
					heads = append(heads, fmt.Sprintf("%s@%d", id, r.Term))
					head = r
				}
			}
			sort.Strings(heads)
			require.LessOrEqual(t, len(heads), 1, "seed %d round %d: two heads run: %v", seed, round, heads)
			for _, id := range ids {
				if r := nodes[id].run; head != nil && r != nil && r.Role == engine.RoleWorker && !r.Stopping {
					require.True(t, r.Head == head.Head && r.Term == head.Term,
						"seed %d round %d: worker %s runs for %s@%d beside head %s@%d", seed, round, id, r.Head, r.Term, head.Head, head.Term)
				}
			}
			if !faulty {
				ready := 0
				for _, id := range ids {
					n := nodes[id]
					if r := n.run; r != nil && !r.Stopping && r.Failed == "" && (r.Role == engine.RoleWorker || r.Phase == gossip.EngineReady) {
						ready++
					}
				}
				if ready == 3 {
					converged = true
					break
				}
			}
		}
		require.True(t, converged, "seed %d: the group never converged after the faults stopped", seed)
	}
}
