package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"

	"github.com/shoalhq/shoal/coordinator/plan"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/nodesource/slurm"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/spec"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// apiError is the one mapping from coordinator errors to gRPC codes.
func apiError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, spec.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, store.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	default:
		return status.Error(codes.Internal, err.Error())
	}
}

// engineChanges lists the fields that shape a replica's engine (model,
// engine, resources) whose values differ between two specs.
func engineChanges(old, cur *spec.Deployment) []string {
	if old.Roles != nil && cur.Roles != nil {
		// Each role's merged settings, named by role ("decode engine.args").
		var out []string
		for _, role := range []string{spec.RolePrefill, spec.RoleDecode} {
			for _, f := range engineChanges(old.RoleDeployment(role), cur.RoleDeployment(role)) {
				out = append(out, role+" "+f)
			}
		}
		return out
	}
	vals := func(d *spec.Deployment) map[string]string {
		m := map[string]string{}
		for _, f := range d.Fields() {
			if strings.HasPrefix(f.Path, "model.") || strings.HasPrefix(f.Path, "engine.") || strings.HasPrefix(f.Path, "resources.") {
				m[f.Path] = f.Value
			}
		}
		return m
	}
	a, b := vals(old), vals(cur)
	var out []string
	for k, v := range b {
		if a[k] != v {
			out = append(out, k)
		}
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// outdatedGroups counts d's serving (not draining) groups that a rollout
// replaces (0 on a store error).
func (c *Coordinator) outdatedGroups(d *spec.Deployment) int {
	if d.Roles != nil {
		return c.outdatedGroups(d.RoleDeployment(spec.RolePrefill)) + c.outdatedGroups(d.RoleDeployment(spec.RoleDecode))
	}
	gs, err := c.store.Groups()
	if err != nil {
		return 0
	}
	n := 0
	for _, g := range gs {
		if g.Deployment == d.Name && !g.Draining() && plan.Outdated(g, d) {
			n++
		}
	}
	return n
}

type apiServer struct {
	coordv1.UnimplementedCoordinatorServer
	c *Coordinator
}

func (s *apiServer) Apply(ctx context.Context, req *coordv1.ApplyRequest) (*coordv1.ApplyResponse, error) {
	d, err := spec.Parse(req.SpecYaml)
	if err == nil && d.Engine.Kind == spec.EngineCommand {
		if terr := engine.ValidateTemplates(d); terr != nil {
			err = fmt.Errorf("%w: %w", spec.ErrInvalid, terr)
		}
	}
	if err == nil {
		err = s.checkPairs(d) // reads the deployments (and their roles) afresh
	}
	if err == nil {
		err = s.checkNames(d)
	}
	if err == nil {
		err = s.checkAdapterNames(d)
	}
	var slurmWarning, keptAdapters string
	specYAML := req.SpecYaml
	if err == nil && d.Engine.LoRA != nil && !spec.HasAdaptersKey(req.SpecYaml) {
		prev, perr := s.c.store.Deployment(d.Name)
		// A spec without an adapters key keeps the adapters added at run
		// time (`adapters: []` removes them).
		if perr == nil && prev.Spec != nil && len(prev.Spec.Adapters) > 0 {
			d.Adapters = prev.Spec.Adapters
			if y, yerr := spec.WithAdapters(req.SpecYaml, d.Adapters); yerr == nil {
				specYAML = y
				keptAdapters = fmt.Sprintf("kept the deployment's %d adapter(s): the applied spec has no adapters key (`adapters: []` removes them)", len(d.Adapters))
			}
		}
	}
	if err == nil {
		slurmWarning, err = s.c.checkSlurm(ctx, d)
	}
	if err != nil {
		return nil, apiError(err)
	}
	// A change of engine settings (the same test the rollout makes) is
	// rolled out; groups that never recorded theirs take the replaced ones.
	var changed []string
	rolling := false
	if prev, perr := s.c.store.Deployment(d.Name); perr == nil && prev.Spec != nil && plan.SpecHash(prev.Spec) != plan.SpecHash(d) {
		rolling, changed = true, engineChanges(prev.Spec, d)
		if err := s.c.store.AdoptSpec(d.Name, plan.SpecHash(prev.Spec)); err != nil {
			return nil, s.c.storeError(err)
		}
	}
	created, err := s.c.store.PutDeployment(d, string(specYAML))
	if err != nil {
		return nil, s.c.storeError(err)
	}
	verb := "updated"
	if created {
		verb = "created"
	}
	if d.Roles != nil {
		p, dc := d.RoleDeployment(spec.RolePrefill), d.RoleDeployment(spec.RoleDecode)
		s.c.events.add(d.Name, "", "deployment %s with roles: prefill %s (%d replica(s) of %d node(s) × %d GPUs), decode %s (%d of %d × %d)", verb,
			p.Name, p.DesiredReplicas(), p.Resources.Nodes, p.Resources.GPUsPerNode, dc.Name, dc.DesiredReplicas(), dc.Resources.Nodes, dc.Resources.GPUsPerNode)
	} else {
		s.c.events.add(d.Name, "", "deployment %s (%d replica(s) of %d node(s) × %d GPUs)", verb, d.DesiredReplicas(), d.Resources.Nodes, d.Resources.GPUsPerNode)
	}
	var warnings []string
	if slurmWarning != "" {
		warnings = append(warnings, slurmWarning)
	}
	if keptAdapters != "" {
		warnings = append(warnings, keptAdapters)
	}
	for _, f := range d.Fields() {
		if !f.Implemented {
			warnings = append(warnings, f.Path+" is stored but not acted on yet")
		}
	}
	if n := s.c.outdatedGroups(d); rolling && n > 0 {
		what := strings.Join(changed, ", ")
		if what == "" {
			what = "engine settings"
		}
		w := fmt.Sprintf("rolling out new engine settings (changed: %s): %d running replica(s) are replaced one at a time, "+
			"a new one serving before an old one drains when there is room; `shoal rollout status %s`, `shoal rollout undo %s`",
			what, n, d.Name, d.Name)
		warnings = append(warnings, w)
		s.c.events.add(d.Name, "", "%s", w)
	}
	s.c.poke()
	return &coordv1.ApplyResponse{Name: d.Name, Created: created, Warnings: warnings}, nil
}

// checkPairs refuses a deployment that would serve a model alongside
// deployments its engines cannot work with: a prefill and a decode
// deployment of one served model must be able to exchange KV
// (spec.CheckPair), and a disaggregated model is not also served whole.
func (s *apiServer) checkPairs(d *spec.Deployment) error {
	recs, err := s.c.deployments()
	if err != nil {
		return nil // the write that follows reports the store's trouble
	}
	if d.Roles != nil {
		// Its roles pair with each other (spec.Validate checked that), and
		// each must get along with the model's other deployments.
		for _, role := range []string{spec.RolePrefill, spec.RoleDecode} {
			if err := s.checkPairsOf(d.RoleDeployment(role), d.Name, recs); err != nil {
				return err
			}
		}
		return nil
	}
	return s.checkPairsOf(d, d.Name, recs)
}

// checkPairsOf checks d against recs, leaving out deployment own (and its
// roles).
func (s *apiServer) checkPairsOf(d *spec.Deployment, own string, recs []*store.DeploymentRecord) error {
	for _, r := range recs {
		o := r.Spec
		if o == nil || o.Name == own || o.Engine.ServedModelName != d.Engine.ServedModelName {
			continue
		}
		if ri, ok := s.c.roleOf(o.Name); ok && ri.parent == own {
			continue
		}
		dk, ok := d.Engine.KVTransfer, o.Engine.KVTransfer
		switch {
		case dk == nil && ok == nil:
		case dk == nil || ok == nil:
			pd, whole := d.Name, o.Name
			if dk == nil {
				pd, whole = o.Name, d.Name
			}
			return fmt.Errorf("%w: model %s is served disaggregated by deployment %s (engine.kvTransfer) and whole by %s: give them different servedModelNames, or set engine.kvTransfer on both",
				spec.ErrInvalid, d.Engine.ServedModelName, pd, whole)
		case dk.Role == spec.RolePrefill && ok.Role == spec.RoleDecode:
			if err := spec.CheckPair(d, o); err != nil {
				return err
			}
		case dk.Role == spec.RoleDecode && ok.Role == spec.RolePrefill:
			if err := spec.CheckPair(o, d); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *apiServer) summary(rec *store.DeploymentRecord, groups []*store.Group) *coordv1.DeploymentSummary {
	d := rec.Spec
	sum := &coordv1.DeploymentSummary{Name: d.Name, Model: d.Engine.ServedModelName, Engine: d.Engine.Kind,
		NodesPerReplica: int32(d.Resources.Nodes), DesiredReplicas: int32(s.c.desiredReplicas(d)), CreatedUnix: rec.Created.Unix()}
	views := s.c.heads.Views()
	for _, g := range groups {
		if g.Deployment == d.Name && views[g.ID].Routable && views[g.ID].Key.Epoch == g.Epoch {
			sum.ReadyReplicas++
		}
	}
	return sum
}

func (s *apiServer) ListDeployments(context.Context, *coordv1.ListDeploymentsRequest) (*coordv1.ListDeploymentsResponse, error) {
	deps, err := s.c.deployments()
	if err != nil {
		return nil, apiError(err)
	}
	groups, err := s.c.store.Groups()
	if err != nil {
		return nil, apiError(err)
	}
	resp := &coordv1.ListDeploymentsResponse{}
	for _, d := range deps {
		resp.Deployments = append(resp.Deployments, s.summary(d, groups))
	}
	return resp, nil
}

func (s *apiServer) DescribeDeployment(_ context.Context, req *coordv1.DescribeDeploymentRequest) (*coordv1.DescribeDeploymentResponse, error) {
	rec, err := s.c.store.Deployment(req.Name)
	if errors.Is(err, store.ErrNotFound) {
		rec, err = s.c.deployment(req.Name) // a role of a deployment
	}
	if err != nil {
		return nil, apiError(err)
	}
	groups, err := s.c.store.Groups()
	if err != nil {
		return nil, apiError(err)
	}
	if rec.Spec.Roles != nil {
		return s.describeRoles(rec, groups)
	}
	resp := &coordv1.DescribeDeploymentResponse{Summary: s.summary(rec, groups), SpecYaml: rec.SpecYAML, Events: s.c.events.list(rec.Name),
		PreviousSpecYaml: rec.PrevSpecYAML}
	if rec.Spec != nil {
		resp.EngineSettings = plan.SpecHash(rec.Spec)
	}
	for _, f := range rec.Spec.Fields() {
		resp.Fields = append(resp.Fields, &coordv1.Field{Path: f.Path, Value: f.Value, Implemented: f.Implemented})
	}
	resp.Replicas = s.c.replicaInfos(rec.Name, groups)
	resp.Autoscaler = s.c.autoscalerStatus(rec.Spec)
	resp.Hold = s.c.holdStatus()
	resp.Adapters = s.c.adapterInfos(rec.Spec, groups)
	return resp, nil
}

func (s *apiServer) DeleteDeployment(_ context.Context, req *coordv1.DeleteDeploymentRequest) (*coordv1.DeleteDeploymentResponse, error) {
	if ri, ok := s.c.roleOf(req.Name); ok {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is the %s role of deployment %s: delete %s, or change roles.%s in its spec", req.Name, ri.role, ri.parent, ri.parent, ri.role)
	}
	if err := s.c.store.DeleteDeployment(req.Name); err != nil {
		return nil, s.c.storeError(err)
	}
	s.c.events.add(req.Name, "", "deployment deleted")
	s.c.poke()
	return &coordv1.DeleteDeploymentResponse{}, nil
}

func (s *apiServer) ListNodes(context.Context, *coordv1.ListNodesRequest) (*coordv1.ListNodesResponse, error) {
	resp := &coordv1.ListNodesResponse{}
	for _, t := range s.c.agents() {
		resp.Nodes = append(resp.Nodes, nodeInfo(t))
	}
	sort.Slice(resp.Nodes, func(i, j int) bool { return resp.Nodes[i].NodeId < resp.Nodes[j].NodeId })
	return resp, nil
}

func nodeInfo(t gossip.Tag) *coordv1.NodeInfo {
	{
		n := &coordv1.NodeInfo{NodeId: t.ID, Address: t.IP(), GpuModel: t.GPUModel, GpuCount: int32(t.GPUs), Healthy: t.Healthy,
			GroupId: t.Group, Epoch: t.Epoch, Rank: int32(t.Rank), EngineState: t.Engine, Rdma: t.RDMA, GpuMemoryGib: int32(t.GPUMemGiB),
			Progress: t.Progress, SlurmJob: t.SlurmJob, SlurmNodes: t.SlurmNodes, SlurmEndsUnix: t.SlurmEnd, PortBand: int32(t.PortBand), Leaving: t.Leaving}
		switch {
		case t.Group == "":
			n.State = "idle"
		default:
			n.State = "assigned"
		}
		switch {
		case t.HeadTerm > 0:
			n.Role = "head"
		case t.Follow != "":
			n.Role = "worker"
		}
		if !t.Healthy {
			n.State = "unhealthy"
		}
		return n
	}
}

// DescribeNode asks the node's agent for its full inventory.
func (s *apiServer) DescribeNode(ctx context.Context, req *coordv1.DescribeNodeRequest) (*coordv1.DescribeNodeResponse, error) {
	t, ok := s.c.agents()[req.NodeId]
	if !ok {
		return nil, apiError(fmt.Errorf("node %q: %w (see `shoal get nodes`)", req.NodeId, store.ErrNotFound))
	}
	resp := &coordv1.DescribeNodeResponse{Node: nodeInfo(t)}
	conn, err := s.c.cfg.TLS.Dial(t.GRPC)
	if err == nil {
		defer conn.Close()
		cctx, cancel := context.WithTimeout(ctx, rpcTimeout)
		defer cancel()
		var st *agentv1.StatusResponse
		if st, err = agentv1.NewAgentClient(conn).Status(cctx, &agentv1.StatusRequest{}); err == nil {
			resp.InventoryJson = st.InventoryJson
		}
	}
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "node %s: its agent did not answer: %v", req.NodeId, err)
	}
	return resp, nil
}

// replicaInfos is the state of each group (of one deployment, or all) as
// `shoal get replicas` and the shoal_replicas gauge show it.
func (c *Coordinator) replicaInfos(dep string, groups []*store.Group) []*coordv1.ReplicaInfo {
	views := c.heads.Views()
	nodes := c.agents()
	specs := map[string]*spec.Deployment{}
	want := map[string]bool{dep: true} // a deployment with roles: its roles' groups
	if recs, err := c.deployments(); err == nil {
		for _, r := range recs {
			specs[r.Name] = r.Spec
			if ri, ok := c.roleOf(r.Name); ok && ri.parent == dep {
				want[r.Name] = true
			}
		}
	}
	var out []*coordv1.ReplicaInfo
	for _, g := range groups {
		if dep != "" && !want[g.Deployment] {
			continue
		}
		ri := &coordv1.ReplicaInfo{GroupId: g.ID, Deployment: g.Deployment, Epoch: g.Epoch, State: "starting", Spec: g.Spec, SlurmJob: g.SlurmJob}
		if d := specs[g.Deployment]; d != nil {
			ri.Outdated = plan.Outdated(g, d)
		}
		draining := g.Draining()
		missing := false
		slowest := -1.0
		for _, m := range g.Members {
			ri.Members = append(ri.Members, m.NodeID)
			t, ok := nodes[m.NodeID]
			if ok && t.SlurmEnd > 0 {
				ri.SlurmEndsUnix = t.SlurmEnd
			}
			if !ok || !t.Healthy {
				missing = true
				continue
			}
			if t.Group == g.ID && t.Epoch == g.Epoch && t.Engine == gossip.EngineDownloading {
				// The replica is as far as its slowest member.
				var pct float64
				fmt.Sscanf(t.Progress, "%f%%", &pct)
				if slowest < 0 || pct < slowest {
					slowest, ri.Progress = pct, t.Progress
				}
			}
		}
		v, ok := views[g.ID]
		switch {
		case draining:
			ri.State = "draining"
		case missing:
			ri.State = "degraded"
		case ok && v.Key.Epoch == g.Epoch && v.Routable:
			ri.State = "ready"
		case ok && v.Key.Epoch == g.Epoch && !v.Connected && v.Metrics != nil:
			// The head's stream broke: what it said last is stale (a
			// "ready" from a dead head). The gossip says within seconds
			// whether the host is gone (degraded) or the stream comes back.
			ri.State = "unreachable"
		case ok && v.Key.Epoch == g.Epoch && v.Metrics != nil && v.Metrics.Reason != "":
			ri.State = v.Metrics.Reason
		}
		if ri.Progress != "" && (ri.State == "starting" || ri.State == gossip.EngineDownloading || ri.State == gossip.EngineRunning) {
			ri.State = gossip.EngineDownloading
		}
		if ok && v.Key.Epoch == g.Epoch {
			ri.Head, ri.Term = v.Key.Node, v.Key.Term
			if m := v.Metrics; m != nil {
				ri.Endpoint, ri.NumRequestsRunning, ri.NumRequestsWaiting, ri.KvCacheUsage = m.Endpoint, m.NumRequestsRunning, m.NumRequestsWaiting, m.KvCacheUsage
				for _, r := range m.Ranks {
					ri.Ranks = append(ri.Ranks, &coordv1.DPRank{Rank: r.Rank, Endpoint: r.Endpoint, NumRequestsRunning: r.NumRequestsRunning,
						NumRequestsWaiting: r.NumRequestsWaiting, KvCacheUsage: r.KvCacheUsage})
				}
			}
		}
		out = append(out, ri)
	}
	return append(out, c.pendingJobs(want, groups)...)
}

// pendingJobs are the Slurm jobs of the deployments in want that no group
// runs on yet: queued (PENDING, with Slurm's reason and the wait so far)
// or started, their agents not yet joined or placed.
func (c *Coordinator) pendingJobs(want map[string]bool, groups []*store.Group) []*coordv1.ReplicaInfo {
	used := map[string]*store.Group{}
	for _, g := range groups {
		if g.SlurmJob != "" {
			used[g.SlurmJob] = g
		}
	}
	now := c.now()
	var out []*coordv1.ReplicaInfo
	byDep := c.slurmJobs(want)
	deps := make([]string, 0, len(byDep))
	for d := range byDep {
		deps = append(deps, d)
	}
	sort.Strings(deps)
	for _, dep := range deps {
		for _, j := range byDep[dep] {
			if used[j.ID] != nil || !j.Active() {
				continue // completing: on its way out
			}
			ri := &coordv1.ReplicaInfo{Deployment: dep, SlurmJob: j.ID, SlurmReason: j.Reason, State: j.State}
			if !j.Submitted.IsZero() {
				ri.SlurmWaitSeconds = int64(now.Sub(j.Submitted) / time.Second)
			}
			if !j.Ends.IsZero() {
				ri.SlurmEndsUnix = j.Ends.Unix()
			}
			if j.State == slurm.StateRunning {
				ri.State, ri.SlurmReason = "joining", "job started on "+j.Nodes+"; waiting for its agents"
				ri.Members = []string{j.Nodes}
			}
			out = append(out, ri)
		}
	}
	return out
}

func (s *apiServer) ListReplicas(_ context.Context, req *coordv1.ListReplicasRequest) (*coordv1.ListReplicasResponse, error) {
	groups, err := s.c.store.Groups()
	if err != nil {
		return nil, apiError(err)
	}
	return &coordv1.ListReplicasResponse{Replicas: s.c.replicaInfos(req.Deployment, groups)}, nil
}

// Demand records a standalone router's held requests for a model.
func (s *apiServer) Demand(_ context.Context, req *coordv1.DemandRequest) (*coordv1.DemandResponse, error) {
	if req.Model == "" {
		return nil, status.Error(codes.InvalidArgument, "demand needs a model")
	}
	s.c.Demand(req.Model)
	return &coordv1.DemandResponse{}, nil
}

// describeRoles is `shoal describe deployment` of a deployment with roles:
// its spec, then each role as a deployment of its own (replicas, metric,
// the autoscaler's decisions), the events of all three.
func (s *apiServer) describeRoles(rec *store.DeploymentRecord, groups []*store.Group) (*coordv1.DescribeDeploymentResponse, error) {
	d := rec.Spec
	resp := &coordv1.DescribeDeploymentResponse{SpecYaml: rec.SpecYAML, PreviousSpecYaml: rec.PrevSpecYAML, Events: s.c.events.list(rec.Name),
		Hold: s.c.holdStatus()}
	sum := &coordv1.DeploymentSummary{Name: d.Name, Model: d.Engine.ServedModelName, Engine: d.Engine.Kind, CreatedUnix: rec.Created.Unix()}
	var status []string
	for _, role := range []string{spec.RolePrefill, spec.RoleDecode} {
		c := d.RoleDeployment(role)
		cr := &store.DeploymentRecord{Name: c.Name, SpecYAML: rec.SpecYAML, Spec: c, Created: rec.Created}
		cs := s.summary(cr, groups)
		sum.DesiredReplicas += cs.DesiredReplicas
		sum.ReadyReplicas += cs.ReadyReplicas
		sum.NodesPerReplica = max(sum.NodesPerReplica, cs.NodesPerReplica)
		line := fmt.Sprintf("%s (%s): %d/%d ready, %d node(s) × %d GPUs, TP %d", role, c.Name, cs.ReadyReplicas, cs.DesiredReplicas,
			c.Resources.Nodes, c.Resources.GPUsPerNode, c.Engine.TensorParallelSize)
		if dp := c.Engine.DataParallel; dp != nil {
			line += fmt.Sprintf(" × DP %d", dp.Size)
		}
		if a := s.c.autoscalerStatus(c); a != "" {
			line += "; autoscaler " + a
		}
		if role == spec.RolePrefill && d.Roles.Ratio != nil {
			line += fmt.Sprintf("; bounded to %s prefill replicas per decode replica (roles.ratio)", d.Roles.Ratio)
		}
		status = append(status, line)
		resp.Replicas = append(resp.Replicas, s.c.replicaInfos(c.Name, groups)...)
		resp.Events = append(resp.Events, s.c.events.list(c.Name)...)
		if role == spec.RolePrefill {
			resp.EngineSettings = plan.SpecHash(c)
		}
	}
	sort.SliceStable(resp.Events, func(i, j int) bool { return resp.Events[i][:8] < resp.Events[j][:8] })
	resp.Summary = sum
	resp.Autoscaler = "roles: " + strings.Join(status, "\n          ")
	for _, f := range d.Fields() {
		resp.Fields = append(resp.Fields, &coordv1.Field{Path: f.Path, Value: f.Value, Implemented: f.Implemented})
	}
	return resp, nil
}

// checkNames refuses a name taken by a role of another deployment, and
// roles whose names another deployment has.
func (s *apiServer) checkNames(d *spec.Deployment) error {
	if ri, taken := s.c.roleOf(d.Name); taken && ri.parent != d.Name {
		return fmt.Errorf("%w: name %s is the %s role of deployment %s: choose another name", spec.ErrInvalid, d.Name, ri.role, ri.parent)
	}
	if d.Roles == nil {
		return nil
	}
	for _, role := range []string{spec.RolePrefill, spec.RoleDecode} {
		n := spec.RoleName(d.Name, role)
		if _, err := s.c.store.Deployment(n); err == nil {
			return fmt.Errorf("%w: roles.%s runs as deployment %s, and a deployment of that name exists: delete it or rename this one", spec.ErrInvalid, role, n)
		}
	}
	return nil
}
