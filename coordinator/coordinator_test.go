package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/coordinator/plan"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/spec"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// fakeMem is the coordinator's gossip, as a test sets it.
type fakeMem struct {
	mu      sync.Mutex
	members map[string]gossip.Tag
	changes chan struct{}
	joined  chan struct{}
}

func newFakeMem() *fakeMem {
	m := &fakeMem{members: map[string]gossip.Tag{}, changes: make(chan struct{}, 1), joined: make(chan struct{})}
	close(m.joined)
	return m
}

func (m *fakeMem) Start() error                  { return nil }
func (m *fakeMem) Run(ctx context.Context) error { <-ctx.Done(); return nil }
func (m *fakeMem) Changes() <-chan struct{}      { return m.changes }
func (m *fakeMem) Joined() <-chan struct{}       { return m.joined }
func (m *fakeMem) Addr() string                  { return "127.0.0.1:7946" }
func (m *fakeMem) PeerAddrs() []string           { return nil }
func (m *fakeMem) Join([]string) (int, error)    { return 0, nil }
func (m *fakeMem) KeyringOp(string, string) error {
	return errors.New("no keyring in this test")
}

func (m *fakeMem) Members() map[string]gossip.Tag {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]gossip.Tag{}
	for k, v := range m.members {
		out[k] = v
	}
	return out
}

func (m *fakeMem) set(ts ...gossip.Tag) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.members = map[string]gossip.Tag{}
	for _, t := range ts {
		m.members[t.ID] = t
	}
}

func (m *fakeMem) update(id string, f func(*gossip.Tag)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := m.members[id]
	f(&t)
	m.members[id] = t
}

// call is one request a fake agent received.
type call struct {
	method string
	group  string
	epoch  uint64
	// stored: the group (at that epoch) was in the store when the call came.
	stored bool
}

// fakeAgent is a real gRPC Agent server on loopback that records calls;
// fail, when set, answers instead of the default success.
type fakeAgent struct {
	agentv1.UnimplementedAgentServer
	id    string
	addr  string
	calls chan call
	seen  func(group string, epoch uint64) bool

	mu   sync.Mutex
	fail []error // answered in turn, then success
	hang bool
}

func startAgent(t *testing.T, id string, seen func(string, uint64) bool) *fakeAgent {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	a := &fakeAgent{id: id, addr: lis.Addr().String(), calls: make(chan call, 64), seen: seen}
	srv := grpc.NewServer()
	agentv1.RegisterAgentServer(srv, a)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return a
}

func (a *fakeAgent) answer(ctx context.Context) error {
	a.mu.Lock()
	hang := a.hang
	var err error
	if len(a.fail) > 0 {
		err, a.fail = a.fail[0], a.fail[1:]
	}
	a.mu.Unlock()
	if hang {
		<-ctx.Done()
		return ctx.Err()
	}
	return err
}

func (a *fakeAgent) record(method, group string, epoch uint64) {
	stored := a.seen != nil && a.seen(group, epoch)
	a.calls <- call{method: method, group: group, epoch: epoch, stored: stored}
}

func (a *fakeAgent) Assign(ctx context.Context, r *agentv1.AssignRequest) (*agentv1.AssignResponse, error) {
	a.record("assign", r.Assignment.GroupId, r.Assignment.Epoch)
	return &agentv1.AssignResponse{}, a.answer(ctx)
}

func (a *fakeAgent) Release(ctx context.Context, r *agentv1.ReleaseRequest) (*agentv1.ReleaseResponse, error) {
	a.record("release", r.GroupId, r.Epoch)
	return &agentv1.ReleaseResponse{}, a.answer(ctx)
}

func (a *fakeAgent) Drain(ctx context.Context, r *agentv1.DrainRequest) (*agentv1.DrainResponse, error) {
	a.record("drain", r.GroupId, r.Epoch)
	return &agentv1.DrainResponse{}, a.answer(ctx)
}

func (a *fakeAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	return &agentv1.StatusResponse{NodeId: a.id, Message: "vllm exited (exit status 1)"}, nil
}

// next waits for the agent's next call.
func (a *fakeAgent) next(t *testing.T) call {
	t.Helper()
	select {
	case c := <-a.calls:
		return c
	case <-time.After(10 * time.Second):
		t.Fatalf("agent %s got no call", a.id)
		return call{}
	}
}

// none checks that the agent got no call: call it after settle, once every
// call the coordinator started has ended.
func (a *fakeAgent) none(t *testing.T) {
	t.Helper()
	select {
	case c := <-a.calls:
		t.Fatalf("agent %s got an unexpected %s", a.id, c.method)
	default:
	}
}

// failingStore fails group writes while failPut is set.
type failingStore struct {
	*store.Store
	mu      sync.Mutex
	failPut bool
}

func (f *failingStore) PutGroup(g *store.Group) error { return f.PutGroups([]*store.Group{g}) }

func (f *failingStore) PutGroups(gs []*store.Group) error {
	f.mu.Lock()
	fail := f.failPut
	f.mu.Unlock()
	if fail {
		return errors.New("disk I/O error")
	}
	return f.Store.PutGroups(gs)
}

type testCoord struct {
	c      *Coordinator
	api    *apiServer
	mem    *fakeMem
	st     *failingStore
	clock  time.Time
	cancel context.CancelFunc
	ctx    context.Context
}

// newCoord builds a coordinator over a real store and fake gossip, with a
// clock the test moves; the test drives reconcile itself.
func newCoord(t *testing.T) *testCoord {
	st, err := store.Open(filepath.Join(t.TempDir(), "coordinator.db"))
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	c := New(Config{Logger: quiet})
	tc := &testCoord{c: c, api: &apiServer{c: c}, mem: newFakeMem(), st: &failingStore{Store: st}, clock: time.Now().Add(-time.Hour)}
	c.store, c.mem = tc.st, tc.mem
	c.now = func() time.Time { return tc.clock }
	c.started = tc.clock
	tc.clock = tc.clock.Add(time.Minute) // past the start-up grace
	tc.ctx, tc.cancel = context.WithCancel(context.Background())
	c.calls = newCaller(tc.ctx, nil, quiet, func() {})
	t.Cleanup(func() {
		tc.cancel()
		c.calls.wait()
		c.heads.StopAll()
	})
	return tc
}

func (tc *testCoord) stored(group string, epoch uint64) bool {
	gs, err := tc.st.Store.Groups()
	if err != nil {
		return false
	}
	for _, g := range gs {
		if g.ID == group && g.Epoch == epoch {
			return true
		}
	}
	return false
}

func (tc *testCoord) reconcile(t *testing.T) {
	t.Helper()
	_, err := tc.c.reconcile(tc.ctx)
	require.NoError(t, err)
}

// settle waits for every call the coordinator started to end.
func (tc *testCoord) settle() { tc.c.calls.wait() }

func (tc *testCoord) apply(t *testing.T, yaml string) *coordv1.ApplyResponse {
	t.Helper()
	resp, err := tc.api.Apply(context.Background(), &coordv1.ApplyRequest{SpecYaml: []byte(yaml)})
	require.NoError(t, err)
	return resp
}

func agentTag(a *fakeAgent) gossip.Tag {
	return gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: a.id, GRPC: a.addr, GPUs: 8, GPUModel: "H200", GPUMemGiB: 141, Healthy: true}
}

const twoNodes = `apiVersion: shoal/v1
name: demo
model: {source: /models/demo}
resources: {nodes: 2, gpusPerNode: 8, gpuModel: H200}
replicas: {count: %d}
`

func spec2(n int) string { return strings.Replace(twoNodes, "%d", string(rune('0'+n)), 1) }

func TestReconcileStoresBeforeItAssigns(t *testing.T) {
	tc := newCoord(t)
	a1, a2 := startAgent(t, "n1", tc.stored), startAgent(t, "n2", tc.stored)
	tc.mem.set(agentTag(a1), agentTag(a2))
	require.True(t, tc.apply(t, spec2(1)).Created)
	tc.reconcile(t)
	for _, a := range []*fakeAgent{a1, a2} {
		c := a.next(t)
		require.Equal(t, "assign", c.method)
		require.Equal(t, uint64(1), c.epoch)
		require.True(t, c.stored, "%s heard of %s before it was stored", a.id, c.group)
	}
}

func TestAFailedStoreWriteTellsNobody(t *testing.T) {
	tc := newCoord(t)
	a1, a2 := startAgent(t, "n1", tc.stored), startAgent(t, "n2", tc.stored)
	tc.mem.set(agentTag(a1), agentTag(a2))
	tc.apply(t, spec2(1))
	tc.st.failPut = true
	tc.reconcile(t)
	tc.settle()
	a1.none(t)
	a2.none(t)
	groups, err := tc.st.Groups()
	require.NoError(t, err)
	require.Empty(t, groups)
	require.Contains(t, strings.Join(tc.c.events.list("demo"), "\n"), "cannot store replica")
	tc.st.failPut = false
	tc.reconcile(t) // the next pass retries
	require.Equal(t, "assign", a1.next(t).method)
	require.Equal(t, "assign", a2.next(t).method)
}

func TestReleaseStraysAndDeletedDeployments(t *testing.T) {
	tc := newCoord(t)
	a1, a2 := startAgent(t, "n1", tc.stored), startAgent(t, "n2", tc.stored)
	t1, t2 := agentTag(a1), agentTag(a2)
	t2.Group, t2.Epoch = "old-group", 4
	tc.mem.set(t1, t2)
	tc.reconcile(t)
	c := a2.next(t)
	require.Equal(t, call{method: "release", group: "old-group", epoch: 4}, c)
	tc.settle()
	a1.none(t)
}

func TestScaleInDrainsThenReleases(t *testing.T) {
	tc := newCoord(t)
	var agents []*fakeAgent
	var tags []gossip.Tag
	for _, id := range []string{"n1", "n2", "n3", "n4"} {
		a := startAgent(t, id, tc.stored)
		agents = append(agents, a)
		tags = append(tags, agentTag(a))
	}
	tc.mem.set(tags...)
	tc.apply(t, spec2(2))
	tc.reconcile(t)
	groups, err := tc.st.Groups()
	require.NoError(t, err)
	require.Len(t, groups, 2)
	byNode := map[string]*store.Group{}
	for _, g := range groups {
		for _, m := range g.Members {
			byNode[m.NodeID] = g
		}
	}
	for i, a := range agents {
		require.Equal(t, "assign", a.next(t).method)
		g := byNode[a.id]
		tc.mem.update(a.id, func(tg *gossip.Tag) { tg.Group, tg.Epoch = g.ID, g.Epoch })
		_ = i
	}
	tc.settle()
	tc.apply(t, spec2(1))
	tc.reconcile(t)
	groups, err = tc.st.Groups()
	require.NoError(t, err)
	var drained *store.Group
	for _, g := range groups {
		if g.Draining() {
			drained = g
		}
	}
	require.NotNil(t, drained, "one group drains, in the store")
	require.True(t, tc.clock.Equal(drained.DrainingSince))
	for _, m := range drained.Members {
		for _, a := range agents {
			if a.id == m.NodeID {
				c := a.next(t)
				require.Equal(t, "drain", c.method, "every member of the draining group is told")
				require.True(t, c.stored, "after the drain is stored")
			}
		}
	}
	tc.settle()
	// No head reports for it: released once the unseen grace passed.
	tc.clock = tc.clock.Add(plan.DrainUnseenGrace + time.Second)
	tc.reconcile(t)
	groups, err = tc.st.Groups()
	require.NoError(t, err)
	require.Len(t, groups, 1)
	for _, m := range drained.Members {
		for _, a := range agents {
			if a.id == m.NodeID {
				require.Equal(t, "release", a.next(t).method)
			}
		}
	}
	require.Contains(t, strings.Join(tc.c.events.list("demo"), "\n"), "SuccessfulRescale: released replica "+drained.ID)
}

func TestIsolationGuardHoldsAndSaysSo(t *testing.T) {
	tc := newCoord(t)
	var tags []gossip.Tag
	for _, id := range []string{"n1", "n2", "n3", "n4", "n5"} {
		tags = append(tags, agentTag(startAgent(t, id, tc.stored)))
	}
	tc.mem.set(tags...)
	tc.apply(t, spec2(2))
	tc.reconcile(t)
	tc.settle()
	groups, err := tc.st.Groups()
	require.NoError(t, err)
	require.Len(t, groups, 2)
	// Cut off: the coordinator sees nobody.
	tc.mem.set()
	tc.clock = tc.clock.Add(time.Second)
	tc.reconcile(t)
	require.True(t, tc.c.guard.Holding)
	require.Equal(t, 1.0, testutil.ToFloat64(tc.c.cm.holding))
	d, err := tc.api.DescribeDeployment(context.Background(), &coordv1.DescribeDeploymentRequest{Name: "demo"})
	require.NoError(t, err)
	require.Contains(t, d.Hold, "lost sight of 5 of 5 agents at once")
	require.Contains(t, strings.Join(d.Events, "\n"), "holding re-forms and scaling")
	after, err := tc.st.Groups()
	require.NoError(t, err)
	require.Equal(t, groups, after, "nothing re-formed while cut off")
	// Healed: the hold lasts HoldAfterHeal more, then ends and says so.
	tc.mem.set(tags...)
	tc.clock = tc.clock.Add(time.Second)
	tc.reconcile(t)
	require.True(t, tc.c.guard.Holding)
	tc.clock = tc.clock.Add(plan.HoldAfterHeal)
	tc.reconcile(t)
	require.False(t, tc.c.guard.Holding)
	require.Equal(t, 0.0, testutil.ToFloat64(tc.c.cm.holding))
	require.Contains(t, strings.Join(tc.c.events.list("demo"), "\n"), "the isolation guard released")
}

func TestCallerRetriesTransientErrors(t *testing.T) {
	tc := newCoord(t)
	a := startAgent(t, "n1", nil)
	a.fail = []error{status.Error(codes.Unavailable, "agent restarting"), status.Error(codes.Unavailable, "agent restarting")}
	var failed error
	done := make(chan struct{})
	tc.c.calls.done = func() { close(done) }
	require.True(t, tc.c.calls.call("n1", a.addr, "release", func(ctx context.Context, cl agentv1.AgentClient) error {
		_, err := cl.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g"})
		return err
	}, func(err error) { failed = err }))
	<-done
	for i := 0; i < 3; i++ {
		require.Equal(t, "release", a.next(t).method, "attempt %d", i+1)
	}
	require.NoError(t, failed)
	require.Empty(t, tc.c.calls.busy(time.Now()), "a call that succeeded leaves no cooldown")
}

func TestCallerRefusalIsFinalAndCoolsDown(t *testing.T) {
	tc := newCoord(t)
	a := startAgent(t, "n1", nil)
	a.fail = []error{status.Error(codes.FailedPrecondition, "node busy")}
	errc := make(chan error, 1)
	do := func(cl agentv1.AgentClient, ctx context.Context) error {
		_, err := cl.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g"})
		return err
	}
	require.True(t, tc.c.calls.call("n1", a.addr, "release", func(ctx context.Context, cl agentv1.AgentClient) error { return do(cl, ctx) },
		func(err error) { errc <- err }))
	require.Equal(t, codes.FailedPrecondition, status.Code(<-errc))
	a.next(t)
	tc.settle()
	a.none(t) // one attempt only
	require.True(t, tc.c.calls.busy(time.Now())["n1"], "the node cools down")
	require.False(t, tc.c.calls.call("n1", a.addr, "release", func(ctx context.Context, cl agentv1.AgentClient) error { return do(cl, ctx) }, nil))
	require.False(t, tc.c.calls.busy(time.Now().Add(2 * nodeCooldown))["n1"])
}

func TestCallerOneCallPerNodeAndStopsOnShutdown(t *testing.T) {
	tc := newCoord(t)
	a := startAgent(t, "n1", nil)
	a.hang = true
	f := func(ctx context.Context, cl agentv1.AgentClient) error {
		_, err := cl.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g"})
		return err
	}
	require.True(t, tc.c.calls.call("n1", a.addr, "release", f, nil))
	a.next(t)
	require.False(t, tc.c.calls.call("n1", a.addr, "release", f, nil), "one call per node at a time")
	start := time.Now()
	tc.cancel()
	tc.c.calls.wait()
	require.Less(t, time.Since(start), 2*time.Second, "shutdown stops the calls, not waits out their timeout")
	require.False(t, tc.c.calls.call("n1", a.addr, "release", f, nil), "no call after shutdown")
}

func TestAPI(t *testing.T) {
	tc := newCoord(t)
	ctx := context.Background()
	_, err := tc.api.Apply(ctx, &coordv1.ApplyRequest{SpecYaml: []byte("apiVersion: shoal/v1\nname: x\nresources: {nodes: 0, gpusPerNode: 8}\n")})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, err.Error(), "resources.nodes")
	resp := tc.apply(t, spec2(1))
	require.True(t, resp.Created)
	require.Empty(t, resp.Warnings, "defaults the user never wrote raise no warning")
	resp = tc.apply(t, spec2(2))
	require.False(t, resp.Created)
	list, err := tc.api.ListDeployments(ctx, &coordv1.ListDeploymentsRequest{})
	require.NoError(t, err)
	require.Len(t, list.Deployments, 1)
	require.Equal(t, int32(2), list.Deployments[0].DesiredReplicas)
	d, err := tc.api.DescribeDeployment(ctx, &coordv1.DescribeDeploymentRequest{Name: "demo"})
	require.NoError(t, err)
	require.Contains(t, strings.Join(d.Events, "\n"), "deployment updated (2 replica(s) of 2 node(s) × 8 GPUs)")
	require.Empty(t, d.Hold)
	_, err = tc.api.DescribeDeployment(ctx, &coordv1.DescribeDeploymentRequest{Name: "nope"})
	require.Equal(t, codes.NotFound, status.Code(err))
	_, err = tc.api.DeleteDeployment(ctx, &coordv1.DeleteDeploymentRequest{Name: "nope"})
	require.Equal(t, codes.NotFound, status.Code(err))
	_, err = tc.api.Demand(ctx, &coordv1.DemandRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	_, err = tc.api.Demand(ctx, &coordv1.DemandRequest{Model: "demo"})
	require.NoError(t, err)
	require.Equal(t, tc.clock, tc.c.demand["demo"], "demand is stamped with the injected clock")
	_, err = tc.api.DeleteDeployment(ctx, &coordv1.DeleteDeploymentRequest{Name: "demo"})
	require.NoError(t, err)
	_, err = tc.api.DescribeNode(ctx, &coordv1.DescribeNodeRequest{NodeId: "n9"})
	require.Equal(t, codes.NotFound, status.Code(err))
}

func TestListNodesAndReplicas(t *testing.T) {
	tc := newCoord(t)
	g := &store.Group{ID: "demo-a", Deployment: "demo", Epoch: 2, Created: tc.clock,
		Members: []store.GroupMember{{NodeID: "n1", GRPC: "n1:1"}, {NodeID: "n2", Rank: 1, GRPC: "n2:1"}}}
	require.NoError(t, tc.st.PutGroup(g))
	in := func(es, pg string) func(*gossip.Tag) {
		return func(t *gossip.Tag) { t.Group, t.Epoch, t.Engine, t.Progress = "demo-a", 2, es, pg }
	}
	tag := func(id string, mods ...func(*gossip.Tag)) gossip.Tag {
		t := gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: id, GRPC: "127.0.0.9:1", GPUs: 8, GPUModel: "H200", Healthy: true}
		for _, m := range mods {
			m(&t)
		}
		return t
	}
	tc.mem.set(tag("n2", in(gossip.EngineDownloading, "40% 1.0 GiB/s")), tag("n1", in(gossip.EngineDownloading, "90% 2.0 GiB/s")),
		tag("n3", func(t *gossip.Tag) { t.Healthy = false }), tag("n4"))
	nodes, err := tc.api.ListNodes(context.Background(), &coordv1.ListNodesRequest{})
	require.NoError(t, err)
	var ids, states []string
	for _, n := range nodes.Nodes {
		ids, states = append(ids, n.NodeId), append(states, n.State)
	}
	require.Equal(t, []string{"n1", "n2", "n3", "n4"}, ids)
	require.Equal(t, []string{"assigned", "assigned", "unhealthy", "idle"}, states)
	reps, err := tc.api.ListReplicas(context.Background(), &coordv1.ListReplicasRequest{})
	require.NoError(t, err)
	require.Len(t, reps.Replicas, 1)
	require.Equal(t, gossip.EngineDownloading, reps.Replicas[0].State)
	require.Equal(t, "40% 1.0 GiB/s", reps.Replicas[0].Progress, "a replica is as far as its slowest member")
	tc.mem.set(tag("n1", in(gossip.EngineRunning, "")))
	reps, err = tc.api.ListReplicas(context.Background(), &coordv1.ListReplicasRequest{})
	require.NoError(t, err)
	require.Equal(t, "degraded", reps.Replicas[0].State, "a member is missing")
	g.DrainingSince = tc.clock
	require.NoError(t, tc.st.PutGroup(g))
	reps, err = tc.api.ListReplicas(context.Background(), &coordv1.ListReplicasRequest{})
	require.NoError(t, err)
	require.Equal(t, "draining", reps.Replicas[0].State)
}

func TestServiceDiscoveryListsAgents(t *testing.T) {
	tc := newCoord(t)
	tc.mem.set(gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: "n1", GRPC: "10.0.0.1:7947", Metrics: "10.0.0.1:9400", Healthy: true},
		gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: "n2", GRPC: "10.0.0.2:7947"},
		gossip.Tag{V: 1, Kind: gossip.KindRouter, ID: "r1", GRPC: "10.0.0.3:8080"})
	srv := httptest.NewServer(tc.c.metricsHandler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/v1/sd/agents")
	require.NoError(t, err)
	defer resp.Body.Close()
	var groups []struct {
		Targets []string          `json:"targets"`
		Labels  map[string]string `json:"labels"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&groups))
	require.Len(t, groups, 1, "agents with a metrics address only")
	require.Equal(t, []string{"10.0.0.1:9400"}, groups[0].Targets)
	resp2, err := srv.Client().Get(srv.URL + "/v1/sd/engines")
	require.NoError(t, err)
	defer resp2.Body.Close()
	b, _ := io.ReadAll(resp2.Body)
	require.Equal(t, "[]\n", string(b), "no head reports yet: no engine to scrape")
}

func TestAutoscalerUsesTheInjectedClock(t *testing.T) {
	tc := newCoord(t)
	d := &spec.Deployment{APIVersion: spec.APIVersion, Name: "auto", Model: spec.Model{Source: "/m"},
		Resources: spec.Resources{Nodes: 1, GPUsPerNode: 8}, Replicas: spec.Replicas{Min: 0, Max: 3},
		Autoscaling: &spec.Autoscaling{Policy: "kpa", Metric: "num_requests_waiting", Target: 4}}
	d.Default()
	require.NoError(t, d.Validate())
	_, err := tc.st.PutDeployment(d, "")
	require.NoError(t, err)
	require.Equal(t, 0, tc.c.desiredReplicas(d), "min until the scaler decides")
	require.NoError(t, tc.c.autoscaleOnce(tc.clock))
	require.Equal(t, 0, tc.c.desiredReplicas(d), "no demand: zero")
	tc.c.Demand("auto")
	require.NoError(t, tc.c.autoscaleOnce(tc.clock))
	require.Equal(t, 1, tc.c.desiredReplicas(d), "held requests scale from zero")
	require.Contains(t, tc.c.autoscalerStatus(d), "desired 1")
	tc.clock = tc.clock.Add(time.Minute) // the demand is old now
	require.NoError(t, tc.c.autoscaleOnce(tc.clock))
	require.Equal(t, 0, tc.c.desiredReplicas(d))
}

// TestReapplySaysItRollsOut: a changed engine setting on a deployment with
// running replicas is rolled out, and the answer and the events say so
// (before: "configured" and silence); the previous spec is kept for undo; a
// change of replica count says nothing of it.
func TestReapplySaysItRollsOut(t *testing.T) {
	tc := newCoord(t)
	require.Empty(t, tc.apply(t, spec2(1)).Warnings)
	require.NoError(t, tc.c.store.PutGroup(&store.Group{ID: "demo-1", Deployment: "demo", Epoch: 1}))
	resp := tc.apply(t, spec2(2))
	require.Empty(t, resp.Warnings, "a replica count applies live")
	changed := spec2(2) + "engine: {args: [--max-num-seqs, \"64\"]}\n"
	resp = tc.apply(t, changed)
	require.Len(t, resp.Warnings, 1)
	require.Contains(t, resp.Warnings[0], "rolling out new engine settings (changed: engine.args): 1 running replica(s) are replaced one at a time")
	d, err := tc.api.DescribeDeployment(context.Background(), &coordv1.DescribeDeploymentRequest{Name: "demo"})
	require.NoError(t, err)
	found := false
	for _, e := range d.Events {
		found = found || strings.Contains(e, "rolling out new engine settings")
	}
	require.True(t, found, "the events say so too")
	require.Equal(t, spec2(2), d.PreviousSpecYaml, "the spec before the engine change, for undo")
	// The group stored without its engine settings (before rollouts) took
	// the replaced ones, so the rollout replaces it too.
	gs, err := tc.c.store.Groups()
	require.NoError(t, err)
	require.Len(t, gs, 1)
	old, err := spec.Parse([]byte(spec2(2)))
	require.NoError(t, err)
	require.Equal(t, plan.SpecHash(old), gs[0].Spec)
	cur, err := spec.Parse([]byte(changed))
	require.NoError(t, err)
	require.True(t, plan.Outdated(gs[0], cur))
}

// TestReapplyOfARoleRollsOut: a change to one role's engine settings of a
// deployment with roles is rolled out and said so, naming the role, and
// the spec before it is kept for `shoal rollout undo` of the deployment
// (before: nothing was said, and undo went back past the change).
func TestReapplyOfARoleRollsOut(t *testing.T) {
	tc := newCoord(t)
	pd := func(decodeArgs string) string {
		return `apiVersion: shoal/v1
name: pd
model: {source: /m}
engine: {kind: vllm, kvTransfer: {connector: nixl}}
resources: {nodes: 1, gpusPerNode: 8}
roles:
  prefill: {replicas: {count: 1}}
  decode: {replicas: {count: 1}, engine: {args: [` + decodeArgs + `]}}
`
	}
	first := pd(`--max-num-seqs, "128"`)
	require.Empty(t, tc.apply(t, first).Warnings)
	d, err := spec.Parse([]byte(first))
	require.NoError(t, err)
	require.NoError(t, tc.c.store.PutGroup(&store.Group{ID: "pd-decode-1", Deployment: "pd-decode", Epoch: 1,
		Spec: plan.SpecHash(d.RoleDeployment(spec.RoleDecode))}))
	resp := tc.apply(t, pd(`--max-num-seqs, "64"`))
	require.Len(t, resp.Warnings, 1)
	require.Contains(t, resp.Warnings[0], "rolling out new engine settings (changed: decode engine.args): 1 running replica(s)")
	desc, err := tc.api.DescribeDeployment(context.Background(), &coordv1.DescribeDeploymentRequest{Name: "pd"})
	require.NoError(t, err)
	require.Equal(t, first, desc.PreviousSpecYaml, "undo goes back to the spec before the role's change")
	outdated := 0
	for _, r := range desc.Replicas {
		if r.Outdated {
			outdated++
		}
	}
	require.Equal(t, 1, outdated, "the decode replica is outdated")
}
