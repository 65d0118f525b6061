package agent

import (
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
)

// The supervisor's decision: a pure function of what this node holds
// (Local), what gossip shows of its group (GroupView), its engine run (if
// any) and the time. The loop (supervisor.go) gathers the input, calls
// Decide, and carries out the one action it returns; the runner does the
// I/O. Every rule of the replica lifecycle that an agent applies is here,
// table-tested in decide_test.go.

// Local is the supervisor's own state: the assignment and everything the
// node advertises about its part in the group.
type Local struct {
	As *Assignment
	// Claim is the term this node claims as head (0: none).
	Claim uint64
	// Follow and FTerm are the head this node follows and its term.
	Follow string
	FTerm  uint64
	// ES is the advertised engine state; Msg the last failure.
	ES  string
	Msg string
	// FailedTerm: a worker whose engine failed at this term waits for its
	// head's next claim instead of restarting at the same term.
	FailedTerm uint64
	// LastTerm is the highest term this node ever claimed (persisted: a new
	// claim is always higher).
	LastTerm uint64
	// Backoff is the next wait before a failed group restarts here;
	// BackoffUntil the end of the current one.
	Backoff      time.Duration
	BackoffUntil time.Time
	// ReadySince is when this head's engine became ready (zero: it is not).
	ReadySince time.Time
	// HoldUntil: an adopted run is not judged before gossip shows its whole
	// group, or this time passes (zero: no hold).
	HoldUntil time.Time
	// Draining: the coordinator asked this group's head to take no new requests.
	Draining bool
}

// RunInfo is this node's engine run, as its runner reports it.
type RunInfo struct {
	Group string
	Epoch uint64
	Term  uint64
	Head  string
	Role  engine.Role
	// Phase is the runner's phase (gossip engine state).
	Phase string
	// Failed is why the run failed ("" while healthy).
	Failed string
	// Stopping: a stop is under way; the GPUs are not free yet.
	Stopping bool
}

// Policy holds the timings the decision uses.
type Policy struct {
	// RestartBackoff is the first wait before a failed group restarts.
	RestartBackoff time.Duration
	// StopGrace is a planned stop's SIGTERM→SIGKILL time.
	StopGrace time.Duration
}

// maxBackoff caps the wait before a failed group is restarted; a group
// that served readyResetAfter gets the first backoff again.
const (
	maxBackoff      = 5 * time.Minute
	readyResetAfter = time.Minute
)

// failStopGrace bounds SIGTERM→SIGKILL when a group failed: nothing in it
// can complete any more (a member is gone), vLLM's API server sits in its
// 5 s watchdog after an engine death without handling SIGTERM, and the
// group's restart, here or elsewhere, waits for these GPUs. Planned stops
// (release, delete, scale-in) keep stop_grace for in-flight requests.
const failStopGrace = time.Second

// Input is everything Decide reads.
type Input struct {
	Now  time.Time
	Self string
	// View is the group in gossip (valid when Local.As is set).
	View  GroupView
	Local Local
	// Run is this node's engine run; nil when none exists (a stopped run's
	// runner is gone once its stop has finished).
	Run *RunInfo
	// Joined: the gossip join completed (an adopted run's hold ends no
	// earlier than the join).
	Joined bool
	// Unhealthy says why this node cannot serve ("" when healthy).
	Unhealthy string
	Policy    Policy
}

// ActionKind is what the supervisor must do after a decision.
type ActionKind int

// Actions.
const (
	ActNone ActionKind = iota
	// ActStart starts a run in Role following Head at Term.
	ActStart
	// ActStop stops the run (Fail: the group failed; advertise it).
	ActStop
)

// Action is at most one thing to do; the loop decides again after doing it.
type Action struct {
	Kind ActionKind
	Role engine.Role
	Head string
	Term uint64
	Why  string
	Fail bool
	// Grace is the stop's SIGTERM→SIGKILL time.
	Grace time.Duration
}

// Output is a decision: the new local state and the action.
type Output struct {
	Local Local
	Act   Action
	// Wake is when to decide again though nothing changed (zero: only on
	// events). It is the earliest deadline the decision waits for.
	Wake time.Time
	// Note is a line for the log when something worth saying happened
	// ("claimed head", "following head", …), with its attributes.
	Note  string
	Attrs []any
	// Warn: Note is a warning.
	Warn bool
	// Claimed: this decision made a new head claim (for the metric).
	Claimed bool
}

// Decide is the supervisor's rule. The safety properties it keeps:
//   - a node has at most one run, and a new run starts only once the old
//     one has stopped (its GPUs are free);
//   - a node's claim and follow never change while a run exists: a run
//     that must end because they change is stopped first, and the change is
//     made by a later decision, so a member never follows a new head while
//     its engine is still joined to the old one, and a head keeps its claim
//     (blocking any other candidate) until its engine is gone;
//   - a head starts its engine only when every member follows it at its
//     term (AllFollow), so two heads can never both run in one epoch.
func Decide(in Input) Output {
	out := Output{Local: in.Local}
	l := &out.Local
	r := in.Run
	if r != nil && r.Stopping {
		return out // nothing changes until the GPUs are free
	}
	if l.As == nil {
		if r != nil {
			out.stop("released", false, in.Policy.StopGrace)
		}
		return out
	}
	if r != nil && (r.Group != l.As.Group || r.Epoch != l.As.Epoch) {
		out.stop("new assignment", false, in.Policy.StopGrace)
		return out
	}
	if r != nil && in.Unhealthy != "" {
		out.fail(in, "node unhealthy: "+in.Unhealthy, true)
		return out
	}
	e := Elect(in.View)
	if !l.HoldUntil.IsZero() {
		switch {
		case in.Joined && e.Complete:
			l.HoldUntil = time.Time{}
		case in.Now.Before(l.HoldUntil):
			out.Wake = l.HoldUntil
			return out
		default:
			l.HoldUntil = time.Time{}
			out.Note, out.Warn = "the adopted run's group is not whole in gossip; judging it with what this node sees", true
		}
	}
	if l.Claim > 0 {
		decideHead(in, e, &out)
	} else {
		decideMember(in, e, &out)
	}
	return out
}

// decideHead: this node claims head at l.Claim.
func decideHead(in Input, e Election, out *Output) {
	l, r, self := &out.Local, in.Run, in.Self
	if e.Candidate != self || !e.Complete {
		why := "group incomplete"
		if e.Complete {
			why = "another member is head: " + e.Candidate
		}
		if r != nil {
			out.fail(in, why, true)
			return
		}
		out.retract(self)
		return
	}
	if r == nil {
		if l.ES == gossip.EngineFailed {
			out.retract(self) // a new term starts after the backoff
			return
		}
		if !AllFollow(in.View, self, l.Claim) {
			l.ES = gossip.EngineWaiting
			return
		}
		out.Act = Action{Kind: ActStart, Role: engine.RoleHead, Head: self, Term: l.Claim}
		l.ES = gossip.EngineStarting
		return
	}
	failed := r.Failed
	if failed == "" {
		if id, ok := MemberFailed(in.View, l.Claim); ok {
			failed = "member " + id + " reports its engine failed"
		} else if !AllFollow(in.View, self, l.Claim) {
			failed = "a member stopped following this head"
		}
	}
	if failed != "" {
		out.fail(in, failed, true)
		return
	}
	l.ES = r.Phase
	if r.Phase != gossip.EngineReady {
		return
	}
	switch {
	case l.ReadySince.IsZero():
		l.ReadySince = in.Now
		out.Wake = in.Now.Add(readyResetAfter)
	case in.Now.Sub(l.ReadySince) >= readyResetAfter:
		l.Backoff = in.Policy.RestartBackoff // it served: the next failure starts the backoff afresh
	default:
		out.Wake = l.ReadySince.Add(readyResetAfter)
	}
}

// decideMember: this node does not claim head.
func decideMember(in Input, e Election, out *Output) {
	l, r, self := &out.Local, in.Run, in.Self
	if e.Candidate == self && e.Complete {
		if r != nil {
			out.fail(in, "becoming head", false)
			return
		}
		if in.Now.Before(l.BackoffUntil) {
			out.Wake = l.BackoffUntil
			return
		}
		term := max(e.MaxTerm, l.LastTerm) + 1
		l.Claim, l.Follow, l.FTerm, l.ES, l.FailedTerm = term, self, term, gossip.EngineWaiting, 0
		l.LastTerm = term
		l.ReadySince = time.Time{}
		out.Claimed = true
		out.Note, out.Attrs = "claimed head", []any{"group", l.As.Group, "epoch", l.As.Epoch, "term", term}
		return
	}
	var head gossip.Tag
	ok := false
	if e.Candidate != "" && e.Candidate != self && e.Complete {
		head, ok = in.View.Tags[e.Candidate]
		ok = ok && head.HeadTerm > 0
	}
	if !ok {
		if r != nil {
			out.fail(in, "no head", true)
			return
		}
		if l.Follow != "" {
			l.Follow, l.FTerm = "", 0
			if l.ES != gossip.EngineFailed {
				l.ES = gossip.EngineIdle
			}
		}
		return
	}
	if l.Follow != head.ID || l.FTerm != head.HeadTerm {
		if r != nil {
			out.fail(in, "following a new head", true)
			return
		}
		l.Follow, l.FTerm, l.ES = head.ID, head.HeadTerm, gossip.EngineIdle
		out.Note, out.Attrs = "following head", []any{"head", head.ID, "term", head.HeadTerm}
		return
	}
	if r == nil {
		up := head.Engine == gossip.EngineDownloading || headUp(head.Engine)
		if up && l.FailedTerm != l.FTerm {
			out.Act = Action{Kind: ActStart, Role: engine.RoleWorker, Head: head.ID, Term: l.FTerm}
			l.ES = gossip.EngineStarting
		}
		return
	}
	if r.Failed != "" {
		out.fail(in, r.Failed, true)
		l.FailedTerm = l.FTerm
		return
	}
	if head.Engine == gossip.EngineFailed || head.Engine == gossip.EngineWaiting || head.Engine == gossip.EngineIdle {
		out.stop("head engine "+orIdle(head.Engine), false, in.Policy.StopGrace)
		l.ES = gossip.EngineIdle
		return
	}
	l.ES = r.Phase
}

// headUp: the head's node process runs, so workers can join it.
func headUp(es string) bool {
	return es == gossip.EngineRunning || es == gossip.EngineLoading || es == gossip.EngineReady
}

func orIdle(s string) string {
	if s == "" {
		return "idle"
	}
	return s
}

func (o *Output) stop(why string, fail bool, grace time.Duration) {
	o.Act = Action{Kind: ActStop, Why: why, Fail: fail, Grace: grace}
}

// fail stops the run as a failure of the group: advertised at once (the
// head and the members react to it), the stop quick, and (backoff) the
// next restart here waits, doubling each time.
func (o *Output) fail(in Input, why string, backoff bool) {
	l := &o.Local
	l.ES, l.Msg = gossip.EngineFailed, why
	l.ReadySince = time.Time{}
	if backoff {
		wait := max(l.Backoff, in.Policy.RestartBackoff)
		l.BackoffUntil = in.Now.Add(wait)
		l.Backoff = min(wait*2, maxBackoff)
		o.Attrs = []any{"reason", why, "restart_backoff", wait}
	} else {
		o.Attrs = []any{"reason", why}
	}
	o.stop(why, true, min(in.Policy.StopGrace, failStopGrace))
	o.Note, o.Warn = "replica failed; stopping the group's engines", true
}

// retract gives up a head claim.
func (o *Output) retract(self string) {
	l := &o.Local
	had := l.Claim
	l.Claim = 0
	if l.Follow == self {
		l.Follow, l.FTerm = "", 0
	}
	if l.ES != gossip.EngineFailed {
		l.ES = gossip.EngineIdle
	}
	if had > 0 {
		o.Note, o.Attrs = "gave up head claim", []any{"term", had}
	}
}
