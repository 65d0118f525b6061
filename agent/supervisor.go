package agent

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
)

// tickInterval bounds how stale the loop's view of gossip and engines can be
// when no event arrives.
const tickInterval = 200 * time.Millisecond

// maxBackoff caps the wait before a failed group is restarted.
const maxBackoff = 5 * time.Minute

// loop is the only goroutine that changes the assignment, claims, follows and
// runs. Everything else asks it through cmds or pokes it through wake.
func (a *Agent) loop(ctx context.Context) {
	t := time.NewTicker(tickInterval)
	defer t.Stop()
	a.publish()
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-a.cmds:
			f()
		case <-a.mem.Changes():
		case <-a.wake:
		case <-t.C:
		}
		a.am.members.Set(float64(a.mem.Count()))
		a.reconcile()
		if err := a.peers.Save(a.mem); err != nil {
			a.log.Debug("remember gossip peers", "err", err)
		}
	}
}

// do runs f on the loop goroutine and waits for it.
func (a *Agent) do(ctx context.Context, f func() error) error {
	errc := make(chan error, 1)
	select {
	case a.cmds <- func() { errc <- f() }:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// memberFlap is how long a group member that vanished from gossip still
// counts as present. Right after a partition heals or a node rejoins,
// memberlist spreads stale "dead" notices that the member refutes within a
// gossip round or two; without this hysteresis such a flap stops a healthy
// replica. A real host death is caught sooner by the head's direct polls of
// its members (MemberGrace), so detection does not wait for it.
const memberFlap = 2 * time.Second

// view is the group as gossip shows it. Loop goroutine only (lastSeen).
func (a *Agent) view(as *Assignment) GroupView {
	v := GroupView{Self: a.cfg.NodeID, Group: as.Group, Epoch: as.Epoch, Members: map[string]int{}, Tags: a.mem.Members()}
	now := time.Now()
	for _, m := range as.Members {
		v.Members[m.NodeID] = m.Rank
		if t, ok := v.Tags[m.NodeID]; ok {
			a.lastSeen[m.NodeID] = seenTag{tag: t, at: now}
		} else if s, ok := a.lastSeen[m.NodeID]; ok && now.Sub(s.at) < memberFlap {
			v.Tags[m.NodeID] = s.tag
		}
	}
	// Our own newest tag, whether or not gossip has echoed it back yet.
	v.Tags[a.cfg.NodeID] = a.mem.Local()
	return v
}

func (a *Agent) reconcile() {
	if !a.holdUntil.IsZero() && a.holding() {
		a.publish()
		return
	}
	a.mu.Lock()
	as := a.state.Assignment
	r := a.run
	a.mu.Unlock()
	if as == nil {
		if r != nil {
			a.stopRun("released")
		}
		a.publish()
		return
	}
	v := a.view(as)
	d := Decide(v)
	a.mu.Lock()
	claim := a.claim
	a.mu.Unlock()

	if claim > 0 {
		a.reconcileHead(as, v, d, claim)
	} else {
		a.reconcileMember(as, v, d)
	}
	a.publish()
}

// holding: an adopted run is not judged until gossip shows its whole group
// (a join through one seed can bring a partial or stale member list), or
// until holdUntil passes.
func (a *Agent) holding() bool {
	a.mu.Lock()
	as := a.state.Assignment
	a.mu.Unlock()
	complete := false
	select {
	case <-a.mem.Joined():
		if as != nil {
			complete = Decide(a.view(as)).Complete
		}
	default:
	}
	if complete || as == nil {
		a.holdUntil = time.Time{}
		return false
	}
	if time.Now().Before(a.holdUntil) {
		return true
	}
	a.log.Warn("the adopted run's group is not whole in gossip; judging it with what this node sees", "waited", holdForJoin)
	a.holdUntil = time.Time{}
	return false
}

// reconcileHead: this node claims head at claim.
func (a *Agent) reconcileHead(as *Assignment, v GroupView, d Decision, claim uint64) {
	self := a.cfg.NodeID
	a.mu.Lock()
	r := a.run
	a.mu.Unlock()
	if d.Candidate != self || !d.Complete {
		why := "group incomplete"
		if d.Complete {
			why = "another member is head: " + d.Candidate
		}
		a.failOrStop(r, why)
		a.retract()
		return
	}
	if r == nil {
		a.mu.Lock()
		failed := a.es == gossip.EngineFailed
		a.mu.Unlock()
		if failed {
			// Give the claim up; a new term starts after the backoff.
			a.retract()
			return
		}
		if !AllFollow(v, self, claim) {
			a.setES(gossip.EngineWaiting)
			return
		}
		a.startRun(as, engine.RoleHead, self, claim, v)
		return
	}
	phase, failed := r.state()
	if failed == "" {
		if id, ok := MemberFailed(v, claim); ok {
			failed = "member " + id + " reports its engine failed"
		} else if !AllFollow(v, self, claim) {
			failed = "a member stopped following this head"
		}
	}
	if failed != "" {
		a.failRun(failed)
		return
	}
	a.setES(phase)
	if phase == gossip.EngineReady {
		a.mu.Lock()
		if a.readySince.IsZero() {
			a.readySince = time.Now()
		} else if time.Since(a.readySince) > time.Minute {
			a.backoff = a.cfg.RestartBackoff
		}
		a.mu.Unlock()
	}
	a.replica.update(a.snapshot(as, r, phase))
}

// reconcileMember: this node does not claim head.
func (a *Agent) reconcileMember(as *Assignment, v GroupView, d Decision) {
	self := a.cfg.NodeID
	a.mu.Lock()
	r, follow, fterm, until := a.run, a.follow, a.fterm, a.backoffUntil
	a.mu.Unlock()
	if d.Candidate == self && d.Complete {
		if time.Now().Before(until) {
			return
		}
		a.failOrStop(r, "becoming head")
		a.mu.Lock()
		term := max(d.MaxTerm, a.state.LastTerm) + 1
		a.claim, a.follow, a.fterm, a.es, a.failedTerm = term, self, term, gossip.EngineWaiting, 0
		a.state.LastTerm = term
		a.readySince = time.Time{}
		a.mu.Unlock()
		if err := a.saveState(); err != nil {
			a.log.Error("persist term", "err", err)
		}
		a.replica.start()
		a.replica.update(a.snapshot(as, nil, gossip.EngineWaiting))
		a.log.Info("claimed head", "group", as.Group, "epoch", as.Epoch, "term", term)
		a.am.claims.Inc()
		return
	}
	var head gossip.Tag
	ok := false
	if d.Candidate != "" && d.Candidate != self && d.Complete {
		head, ok = v.Tags[d.Candidate]
		ok = ok && head.HeadTerm > 0
	}
	if !ok {
		if follow != "" || r != nil {
			a.failOrStop(r, "no head")
			a.mu.Lock()
			a.follow, a.fterm = "", 0
			if a.es != gossip.EngineFailed {
				a.es = gossip.EngineIdle
			}
			a.mu.Unlock()
		}
		return
	}
	if follow != head.ID || fterm != head.HeadTerm {
		a.failOrStop(r, "following a new head")
		a.mu.Lock()
		a.follow, a.fterm, a.es = head.ID, head.HeadTerm, gossip.EngineIdle
		a.mu.Unlock()
		a.log.Info("following head", "head", head.ID, "term", head.HeadTerm)
		return
	}
	if r == nil {
		a.mu.Lock()
		failedHere := a.failedTerm == fterm
		a.mu.Unlock()
		up := head.Engine == gossip.EngineDownloading || headUp(head.Engine)
		if up && !failedHere {
			a.startRun(as, engine.RoleWorker, head.ID, fterm, v)
		}
		return
	}
	phase, failed := r.state()
	if failed != "" {
		a.failRun(failed)
		a.mu.Lock()
		a.failedTerm = fterm
		a.mu.Unlock()
		return
	}
	if head.Engine == gossip.EngineFailed || head.Engine == gossip.EngineWaiting || head.Engine == gossip.EngineIdle {
		a.stopRun("head engine " + orIdle(head.Engine))
		a.setES(gossip.EngineIdle)
		return
	}
	a.setES(phase)
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

func (a *Agent) setES(es string) {
	a.mu.Lock()
	a.es = es
	a.mu.Unlock()
}

// retract gives up a head claim and closes the Replica API.
func (a *Agent) retract() {
	a.mu.Lock()
	had := a.claim
	a.claim = 0
	if a.follow == a.cfg.NodeID {
		a.follow, a.fterm = "", 0
	}
	if a.es != gossip.EngineFailed {
		a.es = gossip.EngineIdle
	}
	a.mu.Unlock()
	a.replica.stop()
	if had > 0 {
		a.log.Info("gave up head claim", "term", had)
	}
}

func (a *Agent) startRun(as *Assignment, role engine.Role, head string, term uint64, v GroupView) {
	headIP := v.Tags[head].IP()
	a.mu.Lock()
	env := map[string]string{} // derived from RDMA, the agent's engine_env applied; the spec's env wins in the plan
	for k, v := range a.hw.NCCLEnv {
		env[k] = v
	}
	if a.hw.Visible != "" {
		env["CUDA_VISIBLE_DEVICES"] = a.hw.Visible // this agent owns a subset of the host's GPUs
	}
	a.mu.Unlock()
	failed := func(what string, err error) {
		a.log.Error(what, "err", err)
		a.mu.Lock()
		a.es, a.msg = gossip.EngineFailed, err.Error()
		a.mu.Unlock()
	}
	mj, err := a.modelFor(as.Spec)
	if err != nil {
		failed("cannot resolve model", err)
		return
	}
	rt, err := a.runtimeFor(context.Background(), as.Spec.Engine.Runtime)
	if err != nil {
		failed("engine runtime", err)
		return
	}
	sp := *as.Spec
	if mj != nil {
		sp.Model.Path = mj.dir // the engine reads the weights where this host keeps them
	}
	bin := engine.Binaries{Ray: a.cfg.RayBin, VLLM: a.cfg.VLLMBin, Python: a.cfg.PythonBin}
	if rt.Kind() == "containerd" {
		bin = engine.Binaries{Ray: "ray", VLLM: "vllm", Python: "python3"} // on the image's PATH
	}
	in := engine.PlanInput{Spec: &sp, Role: role, NodeIP: a.cfg.Address, HeadIP: headIP,
		BindHost: a.cfg.EngineHost, Env: env, Bin: bin}
	var plan *engine.Plan
	switch as.Spec.Engine.Kind {
	case spec.EngineCommand:
		plan, err = engine.CommandPlan(in, runRank(as, head, a.cfg.NodeID))
	case spec.EngineVLLM, spec.EngineSGLang:
		plan, err = engine.NativePlan(in, runRank(as, head, a.cfg.NodeID))
	default:
		plan, err = engine.RayVLLM(in)
	}
	if err == nil && rt.Kind() == "containerd" {
		err = containerize(plan, &sp, map[string]string{"io.shoal.group": as.Group,
			"io.shoal.epoch": strconv.FormatUint(as.Epoch, 10), "io.shoal.term": strconv.FormatUint(term, 10), "io.shoal.role": string(role)})
	}
	if err != nil {
		failed("cannot plan engine", err)
		return
	}
	r := a.newRun(as, role, head, term, plan, rt, mj)
	a.mu.Lock()
	a.run = r
	a.es = gossip.EngineRunning
	a.state.Run = &RunRecord{Group: as.Group, Epoch: as.Epoch, Term: term, Head: head, Role: role, Plan: plan, Runtime: rt.Kind()}
	a.state.Engines = nil
	a.mu.Unlock()
	if err := a.saveState(); err != nil {
		a.log.Error("persist run", "err", err)
	}
	r.log.Info("starting engine", "runtime", rt.Kind())
	a.am.starts.WithLabelValues(string(role)).Inc()
	if role == engine.RoleHead {
		go a.headSequence(r)
		a.watchMembers(r, as.Members)
	} else {
		go a.workerSequence(r)
	}
}

// newRun builds (does not start) a run of plan on rt.
func (a *Agent) newRun(as *Assignment, role engine.Role, head string, term uint64, plan *engine.Plan, rt engine.Runtime, mj *modelJob) *run {
	ctx, cancel := context.WithCancel(context.Background())
	return &run{group: as.Group, epoch: as.Epoch, term: term, head: head, role: role, plan: plan, rt: rt, model: mj,
		headUp: func() bool {
			t, ok := a.mem.Member(head)
			return ok && t.HeadTerm == term && headUp(t.Engine)
		},
		spec: &specRef{served: as.Spec.Engine.ServedModelName, timeout: time.Duration(as.Spec.Engine.StartupTimeoutSeconds) * time.Second,
			hang: a.cfg.HangTimeout, canary: a.cfg.CanaryInterval},
		log: a.log.With("group", as.Group, "epoch", as.Epoch, "term", term, "role", string(role)), wake: a.poke,
		ctx: ctx, cancel: cancel, done: make(chan struct{})}
}

// runRank numbers the members for a rank-based program: the elected head is
// rank 0 (the rendezvous lives there), the others follow in assignment order.
func runRank(as *Assignment, head, self string) int {
	if self == head {
		return 0
	}
	members := append([]Member(nil), as.Members...)
	sort.Slice(members, func(i, j int) bool { return members[i].Rank < members[j].Rank })
	r := 1
	for _, m := range members {
		if m.NodeID == head {
			continue
		}
		if m.NodeID == self {
			return r
		}
		r++
	}
	return r
}

// failStopGrace bounds SIGTERM→SIGKILL when a group failed: nothing in it
// can complete any more (a member is gone), vLLM's API server sits in its
// 5 s watchdog after an engine death without handling SIGTERM, and the
// group's restart, here or elsewhere, waits for these GPUs. Planned stops
// (release, delete, scale-in) keep stop_grace for in-flight requests.
const failStopGrace = time.Second

// stopRun stops the current run, if any, without marking a failure.
func (a *Agent) stopRun(why string) { a.stopRunGrace(why, a.cfg.StopGrace) }

func (a *Agent) stopRunGrace(why string, grace time.Duration) {
	a.mu.Lock()
	r := a.run
	a.run = nil
	a.state.Engines, a.state.Run = nil, nil
	a.mu.Unlock()
	if r == nil {
		return
	}
	r.log.Info("stopping engine", "reason", why)
	a.replica.setServing(false, why)
	var rayStop func(context.Context)
	if r.plan.RayStop && r.rt.Kind() == "process" {
		rayStop = func(ctx context.Context) { a.rayStopForce(ctx, r.plan) }
	}
	r.stop(grace, rayStop)
	if err := a.saveState(); err != nil {
		a.log.Error("persist state", "err", err)
	}
}

// failRun stops the run, advertises the failure and backs off before the
// next attempt.
func (a *Agent) failRun(why string) {
	a.log.Warn("replica failed; stopping the group's engines", "reason", why)
	a.am.failures.Inc()
	a.replica.setServing(false, why)
	a.mu.Lock()
	a.es, a.msg = gossip.EngineFailed, why
	wait := a.backoff
	a.backoffUntil = time.Now().Add(wait)
	a.backoff = min(a.backoff*2, maxBackoff)
	a.readySince = time.Time{}
	a.mu.Unlock()
	a.publish() // tell the group before the (slow) stop
	a.stopRunGrace(why, min(a.cfg.StopGrace, failStopGrace))
	a.log.Info("restart backoff", "wait", wait)
}

// failOrStop ends a run, if any, that must end because the group changed.
// vLLM cannot re-admit a rank, so any running member's end is the group's
// failure: it is advertised and the restart backs off.
func (a *Agent) failOrStop(r *run, why string) {
	if r == nil {
		return
	}
	a.failRun(why)
}

// applyAssignment runs on the loop goroutine.
func (a *Agent) applyAssignment(as *Assignment) error {
	a.mu.Lock()
	cur := a.state.Assignment
	a.mu.Unlock()
	if cur != nil {
		switch {
		case cur.Group == as.Group && cur.Epoch == as.Epoch:
			return nil // idempotent
		case cur.Group == as.Group && as.Epoch < cur.Epoch:
			return fmt.Errorf("%w: group %s epoch %d is older than the current epoch %d", errStale, as.Group, as.Epoch, cur.Epoch)
		case cur.Group != as.Group:
			return fmt.Errorf("%w: node is in group %s (epoch %d); release it first", errBusy, cur.Group, cur.Epoch)
		}
	}
	// A new epoch replaces the old one only after the old engines stopped:
	// a replacement never starts before the GPUs are released.
	a.stopRun("new assignment")
	a.retract()
	weights := a.hasWeights(as.Spec)
	a.mu.Lock()
	a.state.Assignment = as
	a.weights = weights
	a.follow, a.fterm, a.es, a.msg, a.failedTerm = "", 0, gossip.EngineIdle, "", 0
	a.backoff, a.backoffUntil = a.cfg.RestartBackoff, time.Time{}
	a.mu.Unlock()
	if err := a.saveState(); err != nil {
		return err
	}
	a.log.Info("assigned", "deployment", as.Deployment, "group", as.Group, "epoch", as.Epoch, "rank", as.Rank, "members", len(as.Members))
	a.publish()
	return nil
}

func (a *Agent) release(group string, epoch uint64) error {
	a.mu.Lock()
	cur := a.state.Assignment
	a.mu.Unlock()
	if cur == nil || cur.Group != group || (epoch != 0 && cur.Epoch != epoch) {
		return nil
	}
	a.stopRun("released")
	a.retract()
	a.mu.Lock()
	a.state.Assignment = nil
	a.weights = false
	a.follow, a.fterm, a.es, a.msg = "", 0, gossip.EngineIdle, ""
	a.mu.Unlock()
	if err := a.saveState(); err != nil {
		return err
	}
	a.log.Info("released", "group", group, "epoch", cur.Epoch)
	a.publish()
	return nil
}
