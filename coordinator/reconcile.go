package coordinator

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"

	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
)

// rpcTimeout bounds one Assign or Release. An Assign may wait for the node to
// stop an older epoch's engines, so it gets the agent's stop grace and more.
const rpcTimeout = 60 * time.Second

// reconcile moves the cluster one step toward the stored deployments.
func (c *Coordinator) reconcile(ctx context.Context) error {
	deps, err := c.store.Deployments()
	if err != nil {
		return err
	}
	groups, err := c.store.Groups()
	if err != nil {
		return err
	}
	nodes := c.agents()
	byName := map[string]*DeploymentRecord{}
	var models []string
	for _, d := range deps {
		byName[d.Name] = d
		models = append(models, d.Spec.Engine.ServedModelName)
	}
	c.mu.Lock()
	c.models = models
	c.mu.Unlock()
	used := map[string]bool{}
	for _, g := range groups {
		for _, m := range g.Members {
			used[m.NodeID] = true
		}
	}
	perDep := map[string][]*Group{}
	for _, g := range groups {
		d, ok := byName[g.Deployment]
		if !ok {
			c.deleteGroup(g, "deployment deleted")
			continue
		}
		c.reform(d, g, nodes, used) // a new epoch is delivered below
		c.noteFailures(ctx, g, nodes)
		perDep[g.Deployment] = append(perDep[g.Deployment], g)
	}
	for _, d := range deps {
		var have []*Group
		for _, g := range perDep[d.Name] {
			if c.isDraining(g.ID) {
				c.drain(g, "scaled in") // continues a drain; releases when idle
				continue
			}
			have = append(have, g)
		}
		want := c.desiredReplicas(d.Spec)
		for len(have) < want {
			g := c.createGroup(d, nodes, used)
			if g == nil {
				break
			}
			have = append(have, g)
		}
		if len(have) > want {
			// Scale in: drop the groups that serve least (not ready first, newest first).
			sort.SliceStable(have, func(i, j int) bool {
				ri, rj := c.heads.Serving(have[i].ID), c.heads.Serving(have[j].ID)
				if ri != rj {
					return !ri
				}
				return have[i].Created.After(have[j].Created)
			})
			for _, g := range have[:len(have)-want] {
				c.drain(g, "scaled in")
			}
			have = have[len(have)-want:]
		}
		perDep[d.Name] = have
	}
	// Deliver assignments and release strays.
	member := map[string]*Group{}
	for _, gs := range perDep {
		for _, g := range gs {
			for _, m := range g.Members {
				member[m.NodeID] = g
			}
		}
	}
	for id, t := range nodes {
		g, ok := member[id]
		switch {
		case ok && (t.Group != g.ID || t.Epoch != g.Epoch):
			c.assign(ctx, byName[g.Deployment], g, id)
		case !ok && t.Group != "":
			c.release(ctx, t)
		}
	}
	c.heads.Sync(c.wantedHeads(perDep, nodes))
	c.rebuildTable()
	return nil
}

// reform replaces members that left gossip or turned unhealthy: the group
// gets a new epoch with the survivors plus spare nodes. vLLM cannot re-admit
// a replacement rank, so the whole group restarts under the new epoch.
func (c *Coordinator) reform(d *DeploymentRecord, g *Group, nodes map[string]gossip.Tag, used map[string]bool) bool {
	var lost []string
	var keep []GroupMember
	for _, m := range g.Members {
		t, ok := nodes[m.NodeID]
		switch {
		case !ok && c.settling():
			keep = append(keep, m) // not heard from yet, not gone
		case !ok:
			lost = append(lost, m.NodeID+" (gone from gossip)")
		case !t.Healthy:
			lost = append(lost, m.NodeID+" (unhealthy)")
		default:
			keep = append(keep, m)
		}
	}
	if len(lost) == 0 {
		return false
	}
	need := len(g.Members) - len(keep)
	spares := Place(nodes, used, d.Spec.Resources, need)
	if spares == nil {
		c.events.add(d.Name, "reform/"+g.ID, "replica %s lost %s; waiting for %d spare node(s) that fit (%d×%s GPUs)",
			g.ID, strings.Join(lost, ", "), need, d.Spec.Resources.GPUsPerNode, orAny(d.Spec.Resources.GPUModel))
		return false
	}
	members := make([]GroupMember, 0, len(g.Members))
	for _, m := range keep {
		members = append(members, GroupMember{NodeID: m.NodeID, GRPC: m.GRPC})
	}
	var names []string
	for _, s := range spares {
		members = append(members, GroupMember{NodeID: s.ID, GRPC: s.GRPC})
		used[s.ID] = true
		names = append(names, s.ID)
	}
	for i := range members {
		members[i].Rank = i
	}
	g.Members = members
	g.Epoch++
	if err := c.store.PutGroup(g); err != nil {
		c.log.Error("store group", "group", g.ID, "err", err)
		return false
	}
	c.cm.reforms.WithLabelValues(d.Name).Inc()
	c.events.add(d.Name, "reform/"+g.ID, "replica %s re-formed at epoch %d: replaced %s with %s", g.ID, g.Epoch, strings.Join(lost, ", "), strings.Join(names, ", "))
	c.log.Info("group re-formed", "group", g.ID, "epoch", g.Epoch, "lost", lost, "added", names)
	return true
}

func orAny(s string) string {
	if s == "" {
		return "any"
	}
	return s
}

func (c *Coordinator) createGroup(d *DeploymentRecord, nodes map[string]gossip.Tag, used map[string]bool) *Group {
	n := d.Spec.Resources.Nodes
	picked := Place(nodes, used, d.Spec.Resources, n)
	if picked == nil {
		free := 0
		for _, t := range nodes {
			if Fits(t, d.Spec.Resources) && Idle(t, used) {
				free++
			}
		}
		msg := fmt.Sprintf("cannot place a replica: needs %d idle healthy node(s) with %d×%s GPUs, %d available; add nodes or lower replicas",
			n, d.Spec.Resources.GPUsPerNode, orAny(d.Spec.Resources.GPUModel), free)
		c.events.add(d.Name, "place/"+d.Name, "%s", msg)
		c.mu.Lock()
		c.short[d.Name] = msg
		c.mu.Unlock()
		return nil
	}
	c.mu.Lock()
	delete(c.short, d.Name)
	c.mu.Unlock()
	g := &Group{ID: d.Name + "-" + randomSuffix(), Deployment: d.Name, Epoch: 1, Created: time.Now().UTC()}
	var names []string
	for i, t := range picked {
		g.Members = append(g.Members, GroupMember{NodeID: t.ID, Rank: i, GRPC: t.GRPC})
		used[t.ID] = true
		names = append(names, t.ID)
	}
	if err := c.store.PutGroup(g); err != nil {
		c.log.Error("store group", "err", err)
		return nil
	}
	c.events.add(d.Name, "place/"+d.Name, "placed replica %s on %s", g.ID, strings.Join(names, ", "))
	return g
}

func (c *Coordinator) deleteGroup(g *Group, why string) {
	if err := c.store.DeleteGroup(g.ID); err != nil {
		c.log.Error("delete group", "group", g.ID, "err", err)
		return
	}
	c.events.add(g.Deployment, "", "released replica %s: %s", g.ID, why)
	c.log.Info("group released", "group", g.ID, "reason", why)
	// Members are released by the stray pass: their tags name a group that is gone.
}

// beginRPC marks a node busy; false if an RPC to it is already under way.
func (c *Coordinator) beginRPC(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inflight[id] {
		return false
	}
	c.inflight[id] = true
	return true
}

func (c *Coordinator) endRPC(id string) {
	c.mu.Lock()
	delete(c.inflight, id)
	c.mu.Unlock()
	c.poke()
}

func (c *Coordinator) agentCall(ctx context.Context, addr string, f func(context.Context, agentv1.AgentClient) error) error {
	conn, err := c.cfg.TLS.Dial(addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	return f(ctx, agentv1.NewAgentClient(conn))
}

// assign tells one member its assignment, asynchronously.
func (c *Coordinator) assign(ctx context.Context, d *DeploymentRecord, g *Group, id string) {
	if !c.beginRPC(id) {
		return
	}
	pa := &agentv1.Assignment{Deployment: g.Deployment, GroupId: g.ID, Epoch: g.Epoch, SpecJson: d.Spec.JSON()}
	var addr string
	for _, m := range g.Members {
		pa.Members = append(pa.Members, &agentv1.Member{NodeId: m.NodeID, Rank: int32(m.Rank), GrpcAddr: m.GRPC})
		if m.NodeID == id {
			pa.Rank, addr = int32(m.Rank), m.GRPC
		}
	}
	go func() {
		defer c.endRPC(id)
		err := c.agentCall(context.WithoutCancel(ctx), addr, func(ctx context.Context, cl agentv1.AgentClient) error {
			_, err := cl.Assign(ctx, &agentv1.AssignRequest{Assignment: pa})
			return err
		})
		if err != nil {
			c.events.add(g.Deployment, "assign/"+id, "assign %s to %s epoch %d failed: %v", id, g.ID, g.Epoch, err)
			c.log.Warn("assign failed", "node", id, "group", g.ID, "err", err)
			time.Sleep(time.Second) // do not hammer a failing node
		}
	}()
}

// release tells a node to drop a group it is no longer part of.
func (c *Coordinator) release(ctx context.Context, t gossip.Tag) {
	if !c.beginRPC(t.ID) {
		return
	}
	go func() {
		defer c.endRPC(t.ID)
		err := c.agentCall(context.WithoutCancel(ctx), t.GRPC, func(ctx context.Context, cl agentv1.AgentClient) error {
			_, err := cl.Release(ctx, &agentv1.ReleaseRequest{GroupId: t.Group, Epoch: t.Epoch})
			return err
		})
		if err != nil {
			c.log.Warn("release failed", "node", t.ID, "group", t.Group, "err", err)
			time.Sleep(time.Second)
		}
	}()
}

// wantedHeads lists the heads to watch: a member claiming head for the stored
// group at its current epoch.
func (c *Coordinator) wantedHeads(perDep map[string][]*Group, nodes map[string]gossip.Tag) map[router.HeadKey]router.HeadInfo {
	out := map[router.HeadKey]router.HeadInfo{}
	for dep, gs := range perDep {
		for _, g := range gs {
			complete := true
			for _, m := range g.Members {
				t, ok := nodes[m.NodeID]
				if !ok || !t.Healthy || t.Group != g.ID || t.Epoch != g.Epoch {
					complete = false
				}
			}
			for _, m := range g.Members {
				t, ok := nodes[m.NodeID]
				if !ok || t.HeadTerm == 0 || t.Replica == "" || t.Group != g.ID || t.Epoch != g.Epoch {
					continue
				}
				k := router.HeadKey{Node: t.ID, Group: g.ID, Epoch: g.Epoch, Term: t.HeadTerm}
				out[k] = router.HeadInfo{Deployment: dep, Addr: t.Replica, Complete: complete}
			}
		}
	}
	return out
}
