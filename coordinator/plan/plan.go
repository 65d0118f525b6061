// Package plan is the coordinator's reconciler decision: from a snapshot
// of the store (deployments, groups), the gossip (nodes), the heads'
// reports and the time, Compute returns what to store and what to tell
// agents — place, re-form, drain, release — without doing any of it. The
// coordinator's executor writes the plan's groups to the store first and
// only then calls agents; every rule is table-tested here, with an
// injected clock (Snapshot.Now) and ids (Snapshot.NewID).
package plan

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
)

// Deployment is a stored deployment and the replica count to keep (the
// spec's, or the autoscaler's).
type Deployment struct {
	Name    string
	Spec    *spec.Deployment
	Desired int
}

// HeadView is what a group's newest head last reported on its Replica
// stream.
type HeadView struct {
	Node  string
	Epoch uint64
	Term  uint64
	// Connected: the coordinator's stream to the head is up, so the rest
	// is current.
	Connected bool
	Serving   bool
	// Failed: the head says its group failed (an engine or a member).
	Failed bool
	Reason string
	// Idle: metrics are valid and nothing runs or waits; At is when the
	// head took them.
	Idle bool
	At   time.Time
	// HoldsKV: a prefill engine still holds KV blocks that decode engines
	// have not read (its KV use is above zero).
	HoldsKV bool
}

// Snapshot is everything Compute reads.
type Snapshot struct {
	Now time.Time
	// Started is when the coordinator started: a member it has not heard
	// from since is not taken for gone within StartupGrace (its view is
	// still filling up).
	Started     time.Time
	Deployments []Deployment
	Groups      []*store.Group
	// Nodes are the agents gossip shows alive now.
	Nodes map[string]gossip.Tag
	// Absent maps each known agent missing from Nodes to the last time it
	// was seen.
	Absent map[string]time.Time
	// Heads maps a group to its newest head's report.
	Heads map[string]HeadView
	// Hold: the isolation guard holds re-forms and scaling (Guard).
	Hold bool
	// NewID names a new group of a deployment.
	NewID func(deployment string) string
	// Reserved maps the nodes of a Slurm job to the deployment the job is
	// for: only it is placed there, one group per job. Expiring groups
	// are handed over to a replica on another job, then drained; Ended
	// groups lost their job and are deleted (slurmsrc.Plan).
	Reserved map[string]string
	Expiring map[string]string
	Ended    map[string]string
}

// Plan is what the executor does, in this order: write Put, delete Delete,
// then make the calls (Assign, Release, Drain) of groups whose write
// succeeded.
type Plan struct {
	// Put are groups to store: created, re-formed (a new epoch) or whose
	// drain began.
	Put    []*store.Group
	Delete []Delete
	Assign []Assign
	// Release are nodes whose tag names a group they are no longer in.
	Release []Release
	// Drain are members of draining groups whose tag does not say draining.
	Drain  []Call
	Events []Event
	// Short says, per deployment, why a replica cannot be placed.
	Short map[string]string
	// Reformed lists the deployment of each re-formed group (a metric).
	Reformed []string
	// Heads are the head claims to watch.
	Heads map[router.HeadKey]router.HeadInfo
}

// Delete removes a group from the store (its members are released once
// their tags show a group that no longer exists).
type Delete struct {
	Group *store.Group
	Why   string
}

// Assign tells a member its (new) assignment.
type Assign struct {
	Node  string
	Group *store.Group
	Spec  *spec.Deployment
}

// Release tells a node to drop the group its tag names.
type Release struct {
	Node, Addr, Group string
	Epoch             uint64
}

// Call is a call about one group to one member.
type Call struct {
	Node, Addr, Group string
	Epoch             uint64
}

// Event is a line for `shoal describe deployment`; an event whose Key
// repeats its last text is not shown twice.
type Event struct {
	Deployment, Key, Msg string
}

// Timings of the rules.
const (
	// StartupGrace: see Snapshot.Started.
	StartupGrace = 20 * time.Second
	// LongAbsence: a member missing from gossip this long counts as gone
	// without word from its group, if the coordinator is not isolated
	// (Hold): a group whose members are all out of sight says nothing.
	LongAbsence = 30 * time.Second
	// DrainTimeout bounds how long a scale-in waits for in-flight requests.
	DrainTimeout = 2 * time.Minute
	// DrainUnseenGrace is how long a draining group whose head reports
	// nothing waits before it is released anyway (a head that never
	// started, or is gone).
	DrainUnseenGrace = 5 * time.Second
)

type planner struct {
	s    Snapshot
	p    *Plan
	used map[string]bool
}

// Compute is the reconciler's decision.
func Compute(s Snapshot) *Plan {
	pl := &planner{s: s, p: &Plan{Short: map[string]string{}, Heads: map[router.HeadKey]router.HeadInfo{}}, used: map[string]bool{}}
	for _, g := range s.Groups {
		for _, m := range g.Members {
			pl.used[m.NodeID] = true
		}
	}
	byName := map[string]Deployment{}
	for _, d := range s.Deployments {
		byName[d.Name] = d
	}
	groups := append([]*store.Group(nil), s.Groups...)
	sort.SliceStable(groups, func(i, j int) bool {
		if !groups[i].Created.Equal(groups[j].Created) {
			return groups[i].Created.Before(groups[j].Created)
		}
		return groups[i].ID < groups[j].ID
	})
	perDep := map[string][]*store.Group{}
	for _, g := range groups {
		d, ok := byName[g.Deployment]
		if !ok {
			pl.p.Delete = append(pl.p.Delete, Delete{Group: g, Why: "deployment deleted"})
			continue
		}
		if why := s.Ended[g.ID]; why != "" {
			pl.p.Delete = append(pl.p.Delete, Delete{Group: g, Why: why})
			pl.event(g.Deployment, "", "released replica %s: %s", g.ID, why)
			continue
		}
		if !g.Draining() {
			g = pl.reform(d, g)
		}
		perDep[g.Deployment] = append(perDep[g.Deployment], g)
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	sort.Strings(names)
	kept := map[string][]*store.Group{}
	for _, n := range names {
		kept[n] = pl.scale(byName[n], perDep[n])
	}
	pl.deliver(byName, kept)
	return pl.p
}

func (pl *planner) event(dep, key, format string, args ...any) {
	pl.p.Events = append(pl.p.Events, Event{Deployment: dep, Key: key, Msg: fmt.Sprintf(format, args...)})
}

// SpecHash names the settings that shape a replica's engines — model,
// engine, resources — so that a group formed with others is known to be
// outdated. Replica counts, autoscaling, labels and router settings apply
// without replacing anything.
func SpecHash(d *spec.Deployment) string {
	h := sha256.Sum256([]byte(store.EngineSettings(d)))
	return hex.EncodeToString(h[:6])
}

// Outdated: g was formed with other engine settings than d's now.
func Outdated(g *store.Group, d *spec.Deployment) bool {
	return g.Spec != "" && g.Spec != SpecHash(d)
}

// reform replaces the members that are gone: the group gets a new epoch
// with the survivors plus spare nodes. vLLM cannot re-admit a replacement
// rank, so the whole group restarts under the new epoch. It returns the
// group as it stands after the decision.
func (pl *planner) reform(d Deployment, g *store.Group) *store.Group {
	var lost []string
	var keep []store.GroupMember
	for _, m := range g.Members {
		if why := pl.lost(g, m.NodeID); why != "" {
			lost = append(lost, m.NodeID+" ("+why+")")
			continue
		}
		keep = append(keep, m)
	}
	if len(lost) == 0 {
		return g
	}
	if pl.s.Hold {
		return g // lost is "unhealthy" only here; even so, no new placement while isolated
	}
	need := len(g.Members) - len(keep)
	spares := pl.place(d, need, g.SlurmJob)
	if spares == nil {
		pl.event(d.Name, "reform/"+g.ID, "replica %s lost %s; waiting for %d spare node(s) that fit (%d×%s GPUs)",
			g.ID, strings.Join(lost, ", "), need, d.Spec.Resources.GPUsPerNode, orAny(d.Spec.Resources.GPUModel))
		return g
	}
	ng := *g
	ng.Members = make([]store.GroupMember, 0, len(g.Members))
	for _, m := range keep {
		ng.Members = append(ng.Members, store.GroupMember{NodeID: m.NodeID, GRPC: m.GRPC})
	}
	var names []string
	for _, t := range spares {
		ng.Members = append(ng.Members, store.GroupMember{NodeID: t.ID, GRPC: t.GRPC})
		pl.used[t.ID] = true
		names = append(names, t.ID)
	}
	for i := range ng.Members {
		ng.Members[i].Rank = i
	}
	ng.Epoch++
	ng.Spec = SpecHash(d.Spec) // every member is assigned the spec of now
	pl.p.Put = append(pl.p.Put, &ng)
	pl.p.Reformed = append(pl.p.Reformed, d.Name)
	pl.event(d.Name, "reform/"+g.ID, "replica %s re-formed at epoch %d: replaced %s with %s", g.ID, ng.Epoch, strings.Join(lost, ", "), strings.Join(names, ", "))
	return &ng
}

// lost says why member id of g is gone ("" while it is not). A member is
// gone when it says so itself (unhealthy), or when it is missing from
// gossip and its group confirms the loss: the coordinator's own view is
// never enough, since a coordinator that is cut off, or freshly healed,
// sees healthy members vanish. Without word from the group (every member
// out of sight), only a long absence counts, and never while the
// isolation guard holds.
func (pl *planner) lost(g *store.Group, id string) string {
	s := pl.s
	if t, ok := s.Nodes[id]; ok {
		if !t.Healthy {
			return "unhealthy"
		}
		return ""
	}
	since, known := s.Absent[id]
	if s.Hold || s.Now.Sub(s.Started) < StartupGrace && (!known || !since.After(s.Started)) {
		return "" // isolated, or not heard from yet
	}
	if ev := pl.groupFailed(g); ev != "" {
		return "gone from gossip; " + ev
	}
	if known && s.Now.Sub(since) >= LongAbsence {
		return fmt.Sprintf("gone from gossip for %v", s.Now.Sub(since).Round(time.Second))
	}
	return ""
}

// groupFailed is the group's own word that it does not run ("" when it
// runs, or says nothing): its connected head reports a failure, a member
// advertises a failed engine, or no member in sight runs an engine.
func (pl *planner) groupFailed(g *store.Group) string {
	s := pl.s
	if h, ok := s.Heads[g.ID]; ok && h.Epoch == g.Epoch && h.Connected {
		if h.Failed {
			return fmt.Sprintf("its head %s reports: %s", h.Node, h.Reason)
		}
		if h.Serving {
			return ""
		}
	}
	seen, active := 0, 0
	for _, m := range g.Members {
		t, ok := s.Nodes[m.NodeID]
		if !ok || t.Group != g.ID || t.Epoch != g.Epoch {
			continue
		}
		seen++
		switch t.Engine {
		case gossip.EngineFailed:
			return "member " + t.ID + " reports its engine failed"
		case gossip.EngineStarting, gossip.EngineDownloading, gossip.EngineRunning, gossip.EngineLoading, gossip.EngineReady:
			active++
		}
	}
	if seen > 0 && active == 0 {
		return "no member in sight runs an engine"
	}
	return ""
}

func orAny(s string) string {
	if s == "" {
		return "any"
	}
	return s
}

// scale keeps d's replica count: it continues drains, creates groups up to
// the count and drains the surplus, and returns the groups that remain
// members of the deployment (draining ones included).
func (pl *planner) scale(d Deployment, gs []*store.Group) []*store.Group {
	var have, kept []*store.Group
	for _, g := range gs {
		if g.Draining() {
			// While isolated, an unseen head proves nothing: the drain waits.
			if !pl.s.Hold && pl.drained(g) {
				continue
			}
			kept = append(kept, g)
			continue
		}
		have = append(have, g)
	}
	want := d.Desired
	if pl.s.Hold {
		return append(kept, have...) // no scaling while isolated
	}
	for len(have) < want {
		g := pl.create(d)
		if g == nil {
			break
		}
		have = append(have, g)
	}
	// Rollout: groups formed with other engine settings are replaced one at
	// a time. With room for one more group, a new one is placed first
	// (surge) and an outdated one drained once it serves; without room, one
	// outdated group is drained and its replacement placed when its nodes
	// are free. Nothing more happens while a new group is not serving yet
	// or a drain is still running.
	var outdated, expiring int
	pending := false
	for _, g := range have {
		switch {
		case pl.outdated(g, d):
			outdated++
			if !Outdated(g, d.Spec) {
				expiring++
			}
		case !pl.serving(g):
			pending = true
		}
	}
	surged := false
	// A drain still running (rollout or scale-in) is a step in progress too.
	if outdated > 0 && !pending && len(kept) == 0 && len(have) == want && want > 0 {
		if g := pl.create(d); g != nil {
			if expiring == outdated {
				pl.event(d.Name, "handover/"+d.Name, "placed replica %s to take over from %d replica(s) whose Slurm job ends soon", g.ID, expiring)
			} else {
				pl.event(d.Name, "rollout/"+d.Name, "rolling out new engine settings: placed replica %s; %d replica(s) to replace", g.ID, outdated)
			}
			have = append(have, g)
			surged = true
		} else if expiring == outdated {
			// A handover never drains before its replacement serves: the
			// replacement job's nodes have not joined yet.
			delete(pl.p.Short, d.Name)
			pl.event(d.Name, "handover/"+d.Name, "waiting for a replacement job's nodes to hand %d replica(s) over", expiring)
			return append(kept, have...)
		} else {
			delete(pl.p.Short, d.Name) // not short: the rollout waits for room
			return append(kept, pl.drainOne(d, have, "rolled out (no room to surge)")...)
		}
	}
	if len(have) > want && !surged && !(outdated > 0 && pending) {
		// Scale in: drop the groups that serve least (outdated first, then
		// not serving, newest first).
		sort.SliceStable(have, func(i, j int) bool {
			oi, oj := pl.outdated(have[i], d), pl.outdated(have[j], d)
			if oi != oj {
				return oi
			}
			ri, rj := pl.serving(have[i]), pl.serving(have[j])
			if ri != rj {
				return !ri
			}
			return have[i].Created.After(have[j].Created)
		})
		for _, g := range have[:len(have)-want] {
			ng := *g
			ng.DrainingSince, ng.DrainWhy = pl.s.Now, "scaled in"
			if why := pl.s.Expiring[g.ID]; why != "" {
				ng.DrainWhy = "handed over: " + why
			} else if Outdated(g, d.Spec) {
				ng.DrainWhy = "rolled out"
			}
			pl.p.Put = append(pl.p.Put, &ng)
			pl.event(d.Name, "", "draining replica %s: %s", g.ID, ng.DrainWhy)
			kept = append(kept, &ng)
		}
		have = have[len(have)-want:]
	}
	return append(kept, have...)
}

// drainOne begins the drain of one outdated group of have (one that does
// not serve, else the first) and returns have with it draining.
func (pl *planner) drainOne(d Deployment, have []*store.Group, why string) []*store.Group {
	pick := -1
	for i, g := range have {
		if pl.outdated(g, d) && (pick < 0 || (!pl.serving(g) && pl.serving(have[pick]))) {
			pick = i
		}
	}
	if pick < 0 {
		return have
	}
	ng := *have[pick]
	ng.DrainingSince, ng.DrainWhy = pl.s.Now, why
	pl.p.Put = append(pl.p.Put, &ng)
	pl.event(d.Name, "", "draining replica %s: %s", ng.ID, why)
	out := append([]*store.Group(nil), have...)
	out[pick] = &ng
	return out
}

// outdated: g is to be replaced, for its engine settings or because its
// Slurm job ends soon.
func (pl *planner) outdated(g *store.Group, d Deployment) bool {
	return Outdated(g, d.Spec) || pl.s.Expiring[g.ID] != ""
}

func (pl *planner) serving(g *store.Group) bool {
	h, ok := pl.s.Heads[g.ID]
	return ok && h.Epoch == g.Epoch && h.Connected && h.Serving
}

// drained decides a draining group's end: released once its head reports
// nothing running or waiting (measured after the drain began) and, for a
// prefill engine, no KV left for a decode engine to read; or unseen for
// DrainUnseenGrace, or after DrainTimeout. No request is cut off.
func (pl *planner) drained(g *store.Group) bool {
	s := pl.s
	h, seen := s.Heads[g.ID]
	seen = seen && h.Epoch == g.Epoch
	took := s.Now.Sub(g.DrainingSince)
	idle := seen && h.Idle && !h.HoldsKV && h.At.After(g.DrainingSince.Add(time.Second))
	if !idle && (seen || took <= DrainUnseenGrace) && took <= DrainTimeout {
		return false
	}
	pl.p.Delete = append(pl.p.Delete, Delete{Group: g, Why: g.DrainWhy + " (drained)"})
	pl.event(g.Deployment, "", "SuccessfulRescale: released replica %s after %v of draining", g.ID, took.Round(100*time.Millisecond))
	return true
}

func (pl *planner) create(d Deployment) *store.Group {
	res := d.Spec.Resources
	picked := pl.place(d, res.Nodes, "")
	if picked == nil {
		free := 0
		for _, t := range pl.s.Nodes {
			if Fits(t, res) && Idle(t, pl.used) && pl.s.Reserved[t.ID] == reservedFor(d) {
				free++
			}
		}
		msg := fmt.Sprintf("cannot place a replica: needs %d idle healthy node(s) with %d×%s GPUs, %d available; add nodes or lower replicas",
			res.Nodes, res.GPUsPerNode, orAny(res.GPUModel), free)
		if d.Spec.Slurm != nil {
			msg = fmt.Sprintf("waiting for a Slurm job's %d node(s) (%d×%s GPUs) to join; %d idle node(s) of this deployment's jobs so far",
				res.Nodes, res.GPUsPerNode, orAny(res.GPUModel), free)
		}
		pl.event(d.Name, "place/"+d.Name, "%s", msg)
		pl.p.Short[d.Name] = msg
		return nil
	}
	g := &store.Group{ID: pl.s.NewID(d.Name), Deployment: d.Name, Epoch: 1, Created: pl.s.Now.UTC(), Spec: SpecHash(d.Spec)}
	if d.Spec.Slurm != nil {
		g.SlurmJob = picked[0].SlurmJob
	}
	var names []string
	for i, t := range picked {
		g.Members = append(g.Members, store.GroupMember{NodeID: t.ID, Rank: i, GRPC: t.GRPC})
		pl.used[t.ID] = true
		names = append(names, t.ID)
	}
	pl.p.Put = append(pl.p.Put, g)
	pl.event(d.Name, "place/"+d.Name, "placed replica %s on %s", g.ID, strings.Join(names, ", "))
	return g
}

// deliver tells each visible member the assignment its tag lacks, releases
// nodes whose tag names a group they are not in, asks the members of
// draining groups to drain, and lists the heads to watch.
func (pl *planner) deliver(byName map[string]Deployment, kept map[string][]*store.Group) {
	s := pl.s
	member := map[string]*store.Group{}
	for _, gs := range kept {
		for _, g := range gs {
			for _, m := range g.Members {
				member[m.NodeID] = g
			}
		}
	}
	ids := make([]string, 0, len(s.Nodes))
	for id := range s.Nodes {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		t := s.Nodes[id]
		g, ok := member[id]
		switch {
		case ok && (t.Group != g.ID || t.Epoch != g.Epoch):
			if !g.Draining() { // a draining group is never (re)assigned
				pl.p.Assign = append(pl.p.Assign, Assign{Node: id, Group: g, Spec: byName[g.Deployment].Spec})
			}
		case ok && g.Draining() && !t.Draining && t.Group == g.ID && t.Epoch == g.Epoch:
			pl.p.Drain = append(pl.p.Drain, Call{Node: id, Addr: t.GRPC, Group: g.ID, Epoch: g.Epoch})
		case !ok && t.Group != "":
			pl.p.Release = append(pl.p.Release, Release{Node: id, Addr: t.GRPC, Group: t.Group, Epoch: t.Epoch})
		}
	}
	for dep, gs := range kept {
		for _, g := range gs {
			pl.watch(dep, g)
		}
	}
}

// watch lists the members claiming head for g at its epoch.
func (pl *planner) watch(dep string, g *store.Group) {
	complete := true
	for _, m := range g.Members {
		t, ok := pl.s.Nodes[m.NodeID]
		if !ok || !t.Healthy || t.Group != g.ID || t.Epoch != g.Epoch {
			complete = false
		}
	}
	for _, m := range g.Members {
		t, ok := pl.s.Nodes[m.NodeID]
		if !ok || t.HeadTerm == 0 || t.Replica == "" || t.Group != g.ID || t.Epoch != g.Epoch {
			continue
		}
		k := router.HeadKey{Node: t.ID, Group: g.ID, Epoch: g.Epoch, Term: t.HeadTerm}
		pl.p.Heads[k] = router.HeadInfo{Deployment: dep, Addr: t.Replica, Complete: complete, Draining: g.Draining()}
	}
}
