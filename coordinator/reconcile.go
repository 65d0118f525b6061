package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/shoalhq/shoal/coordinator/plan"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
)

// The reconciler: decide, then act. snapshot gathers what plan.Compute
// reads, Compute decides, apply writes the plan's groups to the store and
// only then calls the agents (through the caller, which owns those calls).
// A group whose write failed is not told to anyone; the next pass, which
// reads the store again, retries.

// knownFor is how long an agent that left gossip still counts as known for
// the isolation guard (a node taken out of service for good stops counting).
const knownFor = 10 * time.Minute

// reconcile moves the cluster one step toward the stored deployments. It
// returns when to run again at the latest (zero: on the next event).
func (c *Coordinator) reconcile(ctx context.Context) (time.Time, error) {
	now := c.now()
	snap, err := c.snapshot(now)
	if err != nil {
		return time.Time{}, err
	}
	p := plan.Compute(snap)
	if !c.leading() {
		// A follower acts on nothing: it only keeps its router's view of
		// the heads (the leader's groups, as its copy of the store has them).
		c.mu.Lock()
		c.short = p.Short
		c.mu.Unlock()
		c.heads.Sync(p.Heads)
		c.rebuildTable()
		return c.guard.Wake(), nil
	}
	c.apply(ctx, p)
	return c.guard.Wake(), nil
}

// snapshot reads the store, the gossip, the heads and the guard. Loop only.
func (c *Coordinator) snapshot(now time.Time) (plan.Snapshot, error) {
	recs, err := c.deployments()
	if err != nil {
		return plan.Snapshot{}, err
	}
	groups, err := c.store.Groups()
	if err != nil {
		return plan.Snapshot{}, err
	}
	nodes := c.agents()
	s := plan.Snapshot{Now: now, Started: c.started, Groups: groups, Nodes: nodes, Absent: map[string]time.Time{},
		Heads: c.headViews(), NewID: func(dep string) string { return dep + "-" + randomSuffix() }}
	var models []string
	for _, d := range recs {
		s.Deployments = append(s.Deployments, plan.Deployment{Name: d.Name, Spec: d.Spec, Desired: c.desiredReplicas(d.Spec)})
		models = append(models, d.Spec.Engine.ServedModelName)
	}
	c.mu.Lock()
	c.models = models
	c.mu.Unlock()

	// Who is known, who is in sight, and since when the others are not.
	for id, t := range nodes {
		c.seen[id] = now
		if t.SlurmJob != "" {
			c.seenInJob[id] = true
		} else {
			delete(c.seenInJob, id)
		}
	}
	for _, g := range groups {
		for _, m := range g.Members {
			if _, ok := c.seen[m.NodeID]; !ok {
				c.seen[m.NodeID] = c.started // never seen since this coordinator started
			}
		}
	}
	known := 0
	for id, at := range c.seen {
		_, inSight := nodes[id]
		if (now.Sub(at) > knownFor || c.seenInJob[id] && !inSight) && !c.inGroup(groups, id) {
			// An agent of a Slurm job that is gone left with its job: jobs
			// come and go, and their agents never count for the guard.
			delete(c.seen, id)
			delete(c.seenInJob, id)
			continue
		}
		known++
		if _, ok := nodes[id]; !ok {
			s.Absent[id] = at
		}
	}
	prev := c.guard
	c.guard = c.guard.Next(now, known, len(nodes))
	c.noteGuard(prev, c.guard, recs)
	c.mu.Lock()
	c.guardView = c.guard
	c.mu.Unlock()
	s.Hold = c.guard.Holding
	c.withSlurm(&s)
	return s, nil
}

func (c *Coordinator) inGroup(groups []*store.Group, id string) bool {
	for _, g := range groups {
		for _, m := range g.Members {
			if m.NodeID == id {
				return true
			}
		}
	}
	return false
}

// noteGuard says when the isolation guard starts or stops holding.
func (c *Coordinator) noteGuard(prev, cur plan.Guard, recs []*store.DeploymentRecord) {
	c.cm.holding.Set(map[bool]float64{true: 1}[cur.Holding])
	if cur.Reason == prev.Reason && cur.Holding == prev.Holding {
		return
	}
	msg := "the isolation guard released: re-forms and scaling resume"
	switch {
	case cur.Holding:
		msg = "holding re-forms and scaling: " + cur.Reason
		c.log.Warn("isolation guard", "holding", true, "reason", cur.Reason)
	case cur.Exhausted:
		msg = "re-forms and scaling resume: " + cur.Reason
		c.log.Warn("isolation guard", "holding", false, "reason", cur.Reason)
	default:
		c.log.Info("isolation guard", "holding", false)
	}
	for _, d := range recs {
		c.events.add(d.Name, "", "%s", msg)
	}
}

// headViews is each group's newest head report, as the planner reads it.
func (c *Coordinator) headViews() map[string]plan.HeadView {
	out := map[string]plan.HeadView{}
	for g, v := range c.heads.Views() {
		h := plan.HeadView{Node: v.Key.Node, Epoch: v.Key.Epoch, Term: v.Key.Term, Connected: v.Connected}
		if m := v.Metrics; m != nil {
			h.Serving, h.Failed, h.Reason = m.Serving, m.Failed, m.Reason
			h.Idle = m.MetricsValid && m.NumRequestsRunning == 0 && m.NumRequestsWaiting == 0
			// A prefill engine's finished requests keep their blocks until
			// the decode engines read them (or the lease ends).
			h.HoldsKV = m.Role == router.RolePrefill && m.KvCacheUsage > 0
			h.At = time.UnixMilli(m.UnixMillis)
		}
		out[g] = h
	}
	return out
}

// apply carries out a plan: store first, then the calls. Loop only.
func (c *Coordinator) apply(ctx context.Context, p *plan.Plan) {
	// Every call carries the term this leader leads in, taken before the
	// writes: if leadership is lost meanwhile the writes fail, and agents
	// that obeyed a newer leader refuse the calls.
	term := c.fenceTerm()
	failed := map[string]bool{} // groups whose write failed are left out of every call
	// One write for the pass's groups (one Raft entry when replicated).
	if len(p.Put) > 0 {
		if err := c.store.PutGroups(p.Put); err != nil {
			for _, g := range p.Put {
				failed[g.ID] = true
				c.events.add(g.Deployment, "store/"+g.ID, "cannot store replica %s (%v); retrying", g.ID, err)
			}
			c.log.Error("store groups; the changes wait for the next pass", "groups", len(p.Put), "err", c.storeError(err))
		}
	}
	for _, d := range p.Delete {
		if err := c.store.DeleteGroup(d.Group.ID); err != nil {
			c.log.Error("delete group", "group", d.Group.ID, "err", err)
			continue
		}
		c.events.add(d.Group.Deployment, "", "released replica %s: %s", d.Group.ID, d.Why)
		c.log.Info("group released", "group", d.Group.ID, "reason", d.Why)
	}
	for _, e := range p.Events {
		c.events.add(e.Deployment, e.Key, "%s", e.Msg)
	}
	for _, dep := range p.Reformed {
		c.cm.reforms.WithLabelValues(dep).Inc()
	}
	c.mu.Lock()
	c.short = p.Short
	c.mu.Unlock()
	for _, a := range p.Assign {
		if !failed[a.Group.ID] && !c.calls.holds(a.Node, a.Group.ID, a.Group.Epoch) {
			c.assign(a, term)
		}
	}
	for _, r := range p.Release {
		c.release(r, term)
	}
	for _, d := range p.Drain {
		if !failed[d.Group] {
			c.drainCall(d, term)
		}
	}
	c.noteFailures(ctx)
	c.heads.Sync(p.Heads)
	c.rebuildTable()
}

// assign tells one member its assignment, in the background.
func (c *Coordinator) assign(a plan.Assign, term uint64) {
	g := a.Group
	pa := &agentv1.Assignment{Deployment: g.Deployment, GroupId: g.ID, Epoch: g.Epoch, SpecJson: a.Spec.JSON()}
	var addr string
	for _, m := range g.Members {
		pa.Members = append(pa.Members, &agentv1.Member{NodeId: m.NodeID, Rank: int32(m.Rank), GrpcAddr: m.GRPC})
		if m.NodeID == a.Node {
			pa.Rank, addr = int32(m.Rank), m.GRPC
		}
	}
	c.calls.call(a.Node, addr, "assign", func(ctx context.Context, cl agentv1.AgentClient) error {
		_, err := cl.Assign(ctx, &agentv1.AssignRequest{Assignment: pa, CoordinatorTerm: term})
		if err == nil {
			c.calls.acknowledged(a.Node, g.ID, g.Epoch)
		}
		return err
	}, func(err error) {
		c.events.add(g.Deployment, "assign/"+a.Node, "assign %s to %s epoch %d failed: %v", a.Node, g.ID, g.Epoch, err)
	})
}

// release tells a node to drop a group it is no longer part of.
func (c *Coordinator) release(r plan.Release, term uint64) {
	c.calls.call(r.Node, r.Addr, "release", func(ctx context.Context, cl agentv1.AgentClient) error {
		_, err := cl.Release(ctx, &agentv1.ReleaseRequest{GroupId: r.Group, Epoch: r.Epoch, CoordinatorTerm: term})
		return err
	}, nil)
}

// drainCall asks a member of a draining group to take no new requests.
func (c *Coordinator) drainCall(d plan.Call, term uint64) {
	c.calls.call(d.Node, d.Addr, "drain", func(ctx context.Context, cl agentv1.AgentClient) error {
		_, err := cl.Drain(ctx, &agentv1.DrainRequest{GroupId: d.Group, Epoch: d.Epoch, CoordinatorTerm: term})
		return err
	}, nil)
}

// noteFailures asks members whose engine failed for the reason and records
// it as a deployment event, so `shoal describe deployment` says why a
// replica does not come up (a missing shard, a pull that ran out of time…).
// At most one question per node every failureNoteEvery.
func (c *Coordinator) noteFailures(context.Context) {
	now := c.now()
	for id, t := range c.agents() {
		if t.Engine != gossip.EngineFailed || t.Group == "" || now.Sub(c.failureAsked[id]) < failureNoteEvery {
			continue
		}
		c.failureAsked[id] = now
		dep, group := t.Deployment, t.Group
		c.calls.call(id, t.GRPC, "status", func(ctx context.Context, cl agentv1.AgentClient) error {
			st, err := cl.Status(ctx, &agentv1.StatusRequest{Brief: true})
			if err == nil && st.GetMessage() != "" {
				c.events.add(dep, "fail/"+id, "replica %s: %s engine failed: %s", group, id, st.GetMessage())
			}
			return err
		}, nil)
	}
}

// failureNoteEvery bounds how often a failed member is asked why.
const failureNoteEvery = 3 * time.Second

func randomClusterID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func randomSuffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// holdStatus is the guard's line for `shoal describe` ("" when not holding).
func (c *Coordinator) holdStatus() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	g := c.guardView
	if !g.Holding {
		return ""
	}
	s := fmt.Sprintf("holding re-forms and scaling since %s: %s", g.Since.UTC().Format(time.TimeOnly), g.Reason)
	if !g.Until.IsZero() {
		s += fmt.Sprintf(" (until %s)", g.Until.UTC().Format(time.TimeOnly))
	}
	return s
}
