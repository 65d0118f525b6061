package agent

import (
	"context"
	"errors"
	"fmt"
	"github.com/shoalhq/shoal/agent/kvrelay"
	"log/slog"
	"time"

	"github.com/shoalhq/shoal/agent/runner"
	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
)

// The supervisor loop is the only goroutine that changes the agent's state
// (Local, the run, the hardware view). It wakes on events only — gossip
// changes, a runner's notification, an API call, a deadline the decision
// asked for — gathers Decide's input, calls it, and carries out the one
// action it returns without waiting for any I/O: a runner starts or stops
// engines on its own goroutines, the state store writes state.json, the
// gossip publisher broadcasts the tag.

// activeRun is the loop's record of the run on this node.
type activeRun struct {
	r    *runner.Runner
	info RunInfo
	plan *engine.Plan
	kind string // runtime kind
}

// loop runs the supervisor until ctx ends.
func (a *Agent) loop(ctx context.Context) {
	defer close(a.quit)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		wake := a.step(time.Now())
		timer.Stop()
		if !wake.IsZero() {
			timer.Reset(max(time.Until(wake), time.Millisecond))
		}
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case f := <-a.cmds:
			f()
		case <-a.mem.Changes():
		case <-a.wake:
		case <-timer.C:
		}
	}
}

// errExiting: the loop has ended (the agent is exiting).
var errExiting = errors.New("agent is exiting")

// do runs f on the loop goroutine and waits for it. f must not block.
func (a *Agent) do(ctx context.Context, f func() error) error {
	errc := make(chan error, 1)
	select {
	case a.cmds <- func() { errc <- f() }:
	case <-ctx.Done():
		return ctx.Err()
	case <-a.quit:
		return errExiting
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

// view is the group as gossip shows it at now, with the flap hysteresis,
// and when a member's grace runs out (zero: none is pending). Loop only.
func (a *Agent) view(as *Assignment, now time.Time) (GroupView, time.Time) {
	v := GroupView{Self: a.cfg.NodeID, Group: as.Group, Epoch: as.Epoch, Members: map[string]int{}, Tags: map[string]gossip.Tag{}}
	var expiry time.Time
	for _, m := range as.Members {
		v.Members[m.NodeID] = m.Rank
		if t, ok := a.mem.Member(m.NodeID); ok {
			v.Tags[m.NodeID] = t
			a.lastSeen[m.NodeID] = seenTag{tag: t, at: now}
		} else if s, ok := a.lastSeen[m.NodeID]; ok && now.Sub(s.at) < memberFlap {
			v.Tags[m.NodeID] = s.tag
			if end := s.at.Add(memberFlap); expiry.IsZero() || end.Before(expiry) {
				expiry = end
			}
		}
	}
	for id := range a.lastSeen {
		if _, ok := v.Members[id]; !ok {
			delete(a.lastSeen, id) // not of this group (any more)
		}
	}
	// Our own newest tag, whether or not gossip has echoed it back yet.
	v.Tags[a.cfg.NodeID] = a.mem.Local()
	return v, expiry
}

// policy is the decision's timing configuration.
func (a *Agent) policy() Policy {
	return Policy{RestartBackoff: a.cfg.RestartBackoff, StopGrace: a.cfg.StopGrace}
}

// step decides once and acts; it returns when to decide again at the
// latest (zero: on the next event). Loop only.
func (a *Agent) step(now time.Time) time.Time {
	a.am.members.Set(float64(a.mem.Count()))
	if a.pulled.Swap(false) {
		a.weights = true
	}
	if a.run != nil {
		if st := a.run.r.Status(); st.Stopped {
			a.run = nil
		}
	}
	in := Input{Now: now, Self: a.cfg.NodeID, Local: a.loc, Policy: a.policy(), Unhealthy: a.hw.unhealthy()}
	select {
	case <-a.mem.Joined():
		in.Joined = true
	default:
	}
	var flap time.Time
	if a.loc.As != nil {
		in.View, flap = a.view(a.loc.As, now)
	}
	var st runner.Status
	if a.run != nil {
		st = a.run.r.Status()
		info := a.run.info
		info.Phase, info.Failed, info.Stopping = st.Phase, st.Failed, st.Stopping
		in.Run = &info
	}
	out := Decide(in)
	prev := a.loc
	a.loc = out.Local
	if out.Note != "" {
		lvl := slog.LevelInfo
		if out.Warn {
			lvl = slog.LevelWarn
		}
		a.log.Log(context.Background(), lvl, out.Note, out.Attrs...)
	}
	if out.Claimed {
		a.am.claims.Inc()
	}
	switch out.Act.Kind {
	case ActStart:
		a.startRun(out.Act, in.View)
	case ActStop:
		if out.Act.Fail {
			a.am.failures.Inc()
		}
		a.run.r.Stop(out.Act.Why, out.Act.Grace)
	}
	switch {
	case prev.Claim == 0 && a.loc.Claim > 0:
		a.replica.start()
	case prev.Claim > 0 && a.loc.Claim == 0:
		a.replica.stop()
	}
	a.syncAdapters()
	if a.loc.Claim > 0 {
		var kv *kvrelay.Relay
		if a.run != nil {
			kv = a.run.r.KV()
		}
		var ad adapterLoader
		if a.ad.m != nil {
			ad = a.ad.m
		}
		a.replica.update(a.snapshot(), kv, ad)
	}
	a.persist()
	a.publish()
	if out.Act.Kind != ActNone || a.loc != prev {
		a.poke() // decide again on the new state at once
	}
	wake := out.Wake
	if !flap.IsZero() && (wake.IsZero() || flap.Before(wake)) {
		wake = flap
	}
	return wake
}

// persisted is what state.json depends on, to tell a change cheaply (the
// loop steps on every metrics read of a head; the state rarely changes).
type persisted struct {
	as       *Assignment
	fence    uint64
	lastTerm uint64
	draining bool
	run      *activeRun
	engines  int
}

// persist hands the state to the store when it changed; it returns the
// generation to wait for before answering an API call. Loop only.
func (a *Agent) persist() uint64 {
	key := persisted{as: a.loc.As, fence: a.fence, lastTerm: a.loc.LastTerm, draining: a.loc.Draining, run: a.run}
	var records []engine.Record
	if a.run != nil {
		records = a.run.r.Status().Records
		key.engines = len(records)
	}
	if a.saved.gen > 0 && key == a.saved.key {
		return a.saved.gen
	}
	st := State{NodeID: a.cfg.NodeID, Assignment: a.loc.As, LastTerm: a.loc.LastTerm, Draining: a.loc.Draining, Engines: records,
		CoordinatorTerm: a.fence}
	if a.run != nil {
		i := a.run.info
		st.Run = &RunRecord{Group: i.Group, Epoch: i.Epoch, Term: i.Term, Head: i.Head, Role: i.Role, Plan: a.run.plan, Runtime: a.run.kind}
	}
	a.saved.key, a.saved.gen = key, a.store.Save(st)
	return a.saved.gen
}

// startRun carries out ActStart: plan the engine for this node and start a
// runner. A plan that cannot be made fails the node's part at once. Loop only.
func (a *Agent) startRun(act Action, v GroupView) {
	as := a.loc.As
	ar, err := a.newRun(as, act.Role, act.Head, act.Term, v.Tags[act.Head].IP())
	if err != nil {
		a.log.Error("cannot start the engine", "err", err)
		a.loc.ES, a.loc.Msg = gossip.EngineFailed, err.Error()
		return
	}
	a.run = ar
	a.am.starts.WithLabelValues(string(act.Role)).Inc()
	ar.r.Start()
}

// tag is the gossip tag for the current state. Loop only (or before it runs).
func (a *Agent) tag() gossip.Tag {
	t := gossip.Tag{Kind: gossip.KindAgent, ID: a.cfg.NodeID, GRPC: a.grpcAddr(), Metrics: agentMetricsAddr(a.cfg.MetricsAddr, a.cfg.Address),
		Restarting: a.restarting, SlurmJob: a.cfg.SlurmJob, SlurmNodes: cut(a.cfg.SlurmNodes, gossip.MaxSlurmNodes), PortBand: a.cfg.PortBand, Leaving: a.leaving != ""}
	if !a.jobEnds.IsZero() {
		t.SlurmEnd = a.jobEnds.Unix()
	}
	if a.hw != nil {
		t.Healthy, t.GPUModel, t.GPUs = a.hw.GPU.Healthy(), a.hw.GPU.Model(), len(a.hw.GPU.Devices)
		t.GPUMemGiB = a.hw.minMemGiB()
		if a.hw.RDMASum != "none" {
			t.RDMA = a.hw.RDMASum
		}
	}
	var st runner.Status
	if a.run != nil {
		st = a.run.r.Status()
		t.Stopping = st.Stopping
	}
	if as := a.loc.As; as != nil {
		l := a.loc
		t.Deployment, t.Group, t.Epoch, t.Rank, t.Size = as.Deployment, as.Group, as.Epoch, as.Rank, len(as.Members)
		t.HeadTerm, t.Follow, t.FollowTerm, t.Engine = l.Claim, l.Follow, l.FTerm, l.ES
		t.Weights = a.weights
		t.Draining = l.Draining
		if l.ES == gossip.EngineDownloading {
			t.Progress = st.Progress
		}
		if l.Claim > 0 {
			t.Replica = a.replicaAddr()
		}
	}
	return t
}

// publish advertises the current state in gossip (never waiting for the
// broadcast) and to the Status API. Loop only.
func (a *Agent) publish() {
	t := a.tag()
	a.engineState.Reset()
	a.engineState.WithLabelValues(t.Engine).Set(1)
	if err := a.mem.SetTag(t); err != nil {
		a.log.Error("publish gossip tag", "err", err)
	}
	a.publishStatus()
}

// resume installs a run adopted before the loop starts: the head claims its
// term again and serves, a worker follows its head again, and neither is
// judged before gossip shows the whole group (holdForJoin at most).
func (a *Agent) resume(ar *activeRun) {
	a.run = ar
	i := ar.info
	if i.Role == engine.RoleHead {
		a.loc.Claim, a.loc.Follow, a.loc.FTerm, a.loc.ES = i.Term, a.cfg.NodeID, i.Term, gossip.EngineLoading
		a.replica.start()
	} else {
		a.loc.Follow, a.loc.FTerm, a.loc.ES = i.Head, i.Term, gossip.EngineRunning
	}
	a.loc.HoldUntil = time.Now().Add(holdForJoin)
}

// holdForJoin bounds how long a restarted agent with an adopted engine waits
// for the gossip join before it judges its group (alone, it would see the
// group incomplete and stop a healthy replica).
const holdForJoin = 15 * time.Second

// applyAssignment takes a new assignment (loop). A newer epoch replaces the
// old one at once; the old run is stopped by the next decision and the new
// epoch's engines start only once it has.
// fenced checks a coordinator command's Raft term against the newest this
// node has accepted, and raises that one: a command from an older term (a
// leader that was deposed and does not know it yet) is refused. Term 0 is a
// single coordinator's, which no other can depose: accepted. Loop only; the
// raised term is persisted with the change the command makes, before the
// answer.
func (a *Agent) fenced(term uint64) error {
	if term == 0 {
		return nil
	}
	if term < a.fence {
		a.am.deposed.Inc()
		return fmt.Errorf("%w: its Raft term %d is older than term %d, which this node already obeys", errDeposed, term, a.fence)
	}
	a.fence = term
	return nil
}

func (a *Agent) applyAssignment(as *Assignment) (uint64, error) {
	if cur := a.loc.As; cur != nil {
		switch {
		case cur.Group == as.Group && cur.Epoch == as.Epoch:
			return a.persist(), nil // idempotent; answer once it is durable
		case cur.Group == as.Group && as.Epoch < cur.Epoch:
			return 0, fmt.Errorf("%w: group %s epoch %d is older than the current epoch %d", errStale, as.Group, as.Epoch, cur.Epoch)
		case cur.Group != as.Group:
			return 0, fmt.Errorf("%w: node is in group %s (epoch %d); release it first", errBusy, cur.Group, cur.Epoch)
		}
	}
	a.loc = Local{As: as, LastTerm: a.loc.LastTerm, Backoff: a.cfg.RestartBackoff}
	a.weights = false
	a.checkWeights(as)
	a.log.Info("assigned", "deployment", as.Deployment, "group", as.Group, "epoch", as.Epoch, "rank", as.Rank, "members", len(as.Members))
	a.poke()
	return a.persist(), nil
}

// release forgets the assignment of group (at epoch, or any when 0). Loop.
func (a *Agent) release(group string, epoch uint64) uint64 {
	cur := a.loc.As
	if cur == nil || cur.Group != group || (epoch != 0 && cur.Epoch != epoch) {
		return a.persist()
	}
	a.loc = Local{LastTerm: a.loc.LastTerm, Backoff: a.cfg.RestartBackoff}
	a.weights = false
	a.log.Info("released", "group", group, "epoch", cur.Epoch)
	a.poke()
	return a.persist()
}

// drain marks this node's part of group at epoch as draining. Loop.
func (a *Agent) drain(group string, epoch uint64) (uint64, error) {
	cur := a.loc.As
	if cur == nil || cur.Group != group || cur.Epoch != epoch {
		return 0, fmt.Errorf("%w: node is not in group %s at epoch %d", errBusy, group, epoch)
	}
	if !a.loc.Draining {
		a.loc.Draining = true
		a.log.Info("draining: no new requests", "group", group, "epoch", epoch)
		a.poke()
	}
	return a.persist(), nil
}

// checkWeights finds out, off the loop, whether this host already holds the
// assignment's model (the election prefers such a head).
func (a *Agent) checkWeights(as *Assignment) {
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		has := a.hasWeights(as.Spec)
		_ = a.do(context.Background(), func() error {
			if a.loc.As == as {
				a.weights = has
			}
			return nil
		})
	}()
}
