package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/agent/kvrelay"
	"github.com/shoalhq/shoal/agent/runner"
	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/gpu"
	"github.com/shoalhq/shoal/internal/kvevents"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/rdma"
	"github.com/shoalhq/shoal/spec"
)

// fakeMem is the gossip of a cluster of one, plus the tags a test gives
// other members.
type fakeMem struct {
	mu      sync.Mutex
	local   gossip.Tag
	others  map[string]gossip.Tag
	sets    int
	changes chan struct{}
	joined  chan struct{}
}

func newFakeMem() *fakeMem {
	m := &fakeMem{others: map[string]gossip.Tag{}, changes: make(chan struct{}, 1), joined: make(chan struct{})}
	close(m.joined)
	return m
}

func (m *fakeMem) Start() error                  { return nil }
func (m *fakeMem) Run(ctx context.Context) error { <-ctx.Done(); return nil }
func (m *fakeMem) Changes() <-chan struct{}      { return m.changes }
func (m *fakeMem) Joined() <-chan struct{}       { return m.joined }
func (m *fakeMem) SkipLeave()                    {}
func (m *fakeMem) Addr() string                  { return "127.0.0.1:7946" }
func (m *fakeMem) PeerAddrs() []string           { return nil }
func (m *fakeMem) Count() int                    { m.mu.Lock(); defer m.mu.Unlock(); return 1 + len(m.others) }

func (m *fakeMem) Member(id string) (gossip.Tag, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if id == m.local.ID {
		return m.local, true
	}
	t, ok := m.others[id]
	return t, ok
}

func (m *fakeMem) Local() gossip.Tag {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.local
}

func (m *fakeMem) SetTag(t gossip.Tag) error {
	m.mu.Lock()
	changed := m.local != t
	m.local = t
	m.sets++
	m.mu.Unlock()
	if changed {
		select {
		case m.changes <- struct{}{}:
		default:
		}
	}
	return nil
}

func (m *fakeMem) setCount() int { m.mu.Lock(); defer m.mu.Unlock(); return m.sets }

// fakeRT starts no processes: a start can take startDelay (an image pull),
// a stop the whole grace (an engine that ignores SIGTERM).
type fakeRT struct {
	startDelay time.Duration
	stopFull   bool
	mu         sync.Mutex
	events     []string
}

func (f *fakeRT) Kind() string { return "process" }

func (f *fakeRT) note(e string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, e)
}

func (f *fakeRT) log() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.events...)
}

func (f *fakeRT) Start(ctx context.Context, c engine.Command) (engine.Handle, error) {
	if f.startDelay > 0 {
		t := time.NewTimer(f.startDelay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			f.note("start " + c.Name + " cancelled")
			return nil, ctx.Err()
		}
	}
	f.note("start " + c.Name)
	return &fakeH{rt: f, name: c.Name, Exit: engine.NewExit()}, nil
}

func (f *fakeRT) Adopt(context.Context, engine.Record) (engine.Handle, error) {
	return nil, engine.ErrGone
}

func (f *fakeRT) Exec(context.Context, engine.Handle, engine.Command) ([]byte, error) {
	return []byte("Node status\nActive:\n 1 node_x\nUsage:\n 0.0/8.0 GPU\n"), nil
}

type fakeH struct {
	rt   *fakeRT
	name string
	*engine.Exit
	once sync.Once
}

func (h *fakeH) Name() string    { return h.name }
func (h *fakeH) Pid() int        { return 4242 }
func (h *fakeH) LogPath() string { return "/logs/" + h.name + ".log" }
func (h *fakeH) Record() engine.Record {
	return engine.Record{Name: h.name, Pid: 4242, Runtime: "process"}
}

func (h *fakeH) Stop(_ context.Context, grace time.Duration) error {
	if h.rt.stopFull {
		time.Sleep(grace)
	}
	h.once.Do(func() { h.Finish(nil) })
	h.rt.note("stop " + h.name)
	return nil
}

type okProber struct{}

func (okProber) Ready(context.Context) error                    { return nil }
func (okProber) Canary(context.Context) error                   { return nil }
func (okProber) Scrape(context.Context) (engine.Metrics, error) { return engine.Metrics{}, nil }

// fakeReplica records what the supervisor publishes on the Replica API.
type fakeReplica struct {
	mu     sync.Mutex
	open   bool
	latest *replicav1.Metrics
	kv     *kvrelay.Relay
}

func (r *fakeReplica) start() { r.mu.Lock(); r.open = true; r.mu.Unlock() }
func (r *fakeReplica) stop()  { r.mu.Lock(); r.open, r.latest = false, nil; r.mu.Unlock() }
func (r *fakeReplica) wait()  {}
func (r *fakeReplica) update(m *replicav1.Metrics, kv *kvrelay.Relay, _ adapterLoader) {
	r.mu.Lock()
	r.latest, r.kv = m, kv
	r.mu.Unlock()
}

func (r *fakeReplica) relay() *kvrelay.Relay {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.kv
}

func (r *fakeReplica) metrics() *replicav1.Metrics {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.latest
}

type harness struct {
	a   *Agent
	srv *agentServer
	mem *fakeMem
	rt  *fakeRT
	rep *fakeReplica
	dir string
}

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// start runs an agent's loop (no sockets: fake gossip, runtime, engine and
// Replica API) until the test ends. Call inside a synctest bubble.
func start(t *testing.T, rt *fakeRT) *harness {
	dir := t.TempDir()
	ins, err := gpu.New("mock:h200x8")
	require.NoError(t, err)
	a, err := New(Config{NodeID: "n1", Address: "127.0.0.1", StateDir: dir, StopGrace: 30 * time.Second, RestartBackoff: 5 * time.Second,
		SkipLocalModelCheck: true, Logger: quietLog, Containerd: ContainerdConfig{Address: filepath.Join(dir, "no.sock")}},
		ins, &rdma.Scanner{SysRoot: t.TempDir(), DevRoot: t.TempDir()})
	require.NoError(t, err)
	h := &harness{a: a, srv: &agentServer{a: a}, mem: newFakeMem(), rt: rt, rep: &fakeReplica{}, dir: dir}
	a.mem, a.replica = h.mem, h.rep
	a.rts.open = func(context.Context, string) (engine.Runtime, error) { return rt, nil }
	a.prober = func(string, string, string, map[string]any) runner.Prober { return okProber{} }
	// The engine's KV events: one block stored, then quiet until the run ends.
	a.kvSubscribe = func(ctx context.Context, k *engine.KVEvents, h kvevents.Handler) error {
		h.Batch(0, kvevents.Batch{Events: []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{42}, BlockSize: 16}}})
		<-ctx.Done()
		return nil
	}
	a.dial = func(addr string) (runner.MemberClient, error) { return nil, errors.New("no members in this test") }
	adopted, err := a.prepare(context.Background())
	require.NoError(t, err)
	require.Nil(t, adopted)
	a.mem.SetTag(a.tag())
	a.publishStatus()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); a.store.Run(ctx) }()
	go func() { defer wg.Done(); a.loop(ctx) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		if a.run != nil { // what the loop left running
			a.run.r.Stop("test over", time.Millisecond)
			<-a.run.r.Done()
		}
		a.bg.Wait()
	})
	return h
}

// assignment of n1 alone to a one-node ray-vllm group.
func oneNode(group string, epoch uint64) *agentv1.AssignRequest {
	d := &spec.Deployment{APIVersion: spec.APIVersion, Name: "d", Model: spec.Model{Source: "/models/d"},
		Resources: spec.Resources{Nodes: 1, GPUsPerNode: 8}, Engine: spec.Engine{StartupTimeoutSeconds: 600}}
	d.Default()
	return &agentv1.AssignRequest{Assignment: &agentv1.Assignment{Deployment: "d", GroupId: group, Epoch: epoch, SpecJson: d.JSON(),
		Members: []*agentv1.Member{{NodeId: "n1", GrpcAddr: "127.0.0.1:7947"}}}}
}

// until waits (in fake time) for cond, polled each 10 ms, for at most d.
func until(t *testing.T, d time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (h *harness) status() *agentv1.StatusResponse {
	st, _ := h.srv.Status(context.Background(), nil)
	return st
}

// timed runs f and returns how long it took in the bubble's time: a call
// that waits for an image pull or an engine's stop shows that wait.
func timed(f func()) time.Duration {
	start := time.Now()
	f()
	return time.Since(start)
}

func TestAPIAnswersWhileAnImagePulls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{startDelay: 10 * time.Minute})
		ctx := context.Background()
		took := timed(func() {
			_, err := h.srv.Assign(ctx, oneNode("g1", 1))
			require.NoError(t, err)
		})
		require.Less(t, took, 100*time.Millisecond)
		until(t, time.Second, func() bool { return h.status().EngineState == gossip.EngineStarting }, "the run starts")
		time.Sleep(time.Minute) // the pull is under way
		require.Less(t, timed(func() { _ = h.status() }), 100*time.Millisecond, "Status")
		require.Equal(t, "head", h.status().Role)
		took = timed(func() {
			_, err := h.srv.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g1", Epoch: 1})
			require.NoError(t, err)
		})
		require.Less(t, took, 100*time.Millisecond, "Release does not wait for the pull")
		require.Nil(t, h.status().Assignment)
		took = timed(func() {
			_, err := h.srv.Assign(ctx, oneNode("g2", 1))
			require.NoError(t, err)
		})
		require.Less(t, took, 100*time.Millisecond, "Assign does not wait for the old run")
		until(t, time.Second, func() bool { return len(h.rt.log()) > 0 }, "the pull is cancelled")
		require.Equal(t, []string{"start ray cancelled"}, h.rt.log(), "the cancelled pull started nothing")
	})
}

// TestHeadRelaysKVEvents: a ray-vllm head's run relays its engine's KV
// events on the Replica API; the relay ends with the run.
func TestHeadRelaysKVEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		_, err := h.srv.Assign(context.Background(), oneNode("g1", 1))
		require.NoError(t, err)
		until(t, 5*time.Second, func() bool { return h.status().EngineState == gossip.EngineReady }, "ready")
		kv := h.rep.relay()
		require.NotNil(t, kv, "the head publishes its relay")
		_, blocks := kv.Stats()
		require.Equal(t, 1, blocks)
		snap, ch, _, cancel := kv.Subscribe()
		defer cancel()
		require.Equal(t, "sha256_cbor", snap.Info.Algo)
		require.Equal(t, 16, snap.Info.BlockSize)
		_, err = h.srv.Release(context.Background(), &agentv1.ReleaseRequest{GroupId: "g1", Epoch: 1})
		require.NoError(t, err)
		for range ch {
		}
		// the channel closed: the run, and with it the relay, ended
	})
}

func TestAPIAnswersWhileAGroupTakesItsGraceToStop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{stopFull: true})
		ctx := context.Background()
		_, err := h.srv.Assign(ctx, oneNode("g1", 1))
		require.NoError(t, err)
		until(t, 5*time.Second, func() bool { return h.status().EngineState == gossip.EngineReady }, "ready")
		require.True(t, h.rep.metrics().GetServing())
		released := time.Now()
		took := timed(func() {
			_, err := h.srv.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g1", Epoch: 1})
			require.NoError(t, err)
		})
		require.Less(t, took, 100*time.Millisecond, "Release does not wait for the 30 s grace")
		until(t, time.Second, func() bool { return h.status().Stopping }, "the stop is under way")
		require.True(t, h.mem.Local().Stopping, "the tag says the GPUs are not free yet")
		require.Empty(t, h.mem.Local().Group)
		took = timed(func() {
			_, err := h.srv.Assign(ctx, oneNode("g2", 1))
			require.NoError(t, err)
		})
		require.Less(t, took, 100*time.Millisecond, "Assign does not wait for the stop")
		require.Equal(t, "g2", h.status().Assignment.GetGroupId())
		until(t, time.Minute, func() bool { return h.status().EngineState == gossip.EngineReady }, "the new group serves")
		ev := h.rt.log()
		require.Equal(t, []string{"start ray", "start vllm", "stop vllm", "stop ray", "start ray", "start vllm"}, ev,
			"the new epoch's engines start only after the old ones stopped")
		require.GreaterOrEqual(t, time.Since(released), 60*time.Second, "two processes, each its full grace")
		require.False(t, h.mem.Local().Stopping)
	})
}

func TestAssignIsDurableBeforeItIsAnswered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		_, err := h.srv.Assign(context.Background(), oneNode("g1", 3))
		require.NoError(t, err)
		b, err := os.ReadFile(filepath.Join(h.dir, stateFile))
		require.NoError(t, err)
		var st State
		require.NoError(t, json.Unmarshal(b, &st))
		require.Equal(t, "g1", st.Assignment.Group)
		require.Equal(t, uint64(3), st.Assignment.Epoch)
		_, err = h.srv.Assign(context.Background(), oneNode("g1", 2))
		require.ErrorContains(t, err, "older than the current epoch 3")
		_, err = h.srv.Assign(context.Background(), oneNode("g9", 1))
		require.ErrorContains(t, err, "release it first")
	})
}

// TestCommandsOfADeposedLeaderAreRefused: once a node obeyed a coordinator
// leader's term, a command from an older term changes nothing, and the term
// is on disk before the command that raised it is answered.
func TestCommandsOfADeposedLeaderAreRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		ctx := context.Background()
		req := oneNode("g1", 1)
		req.CoordinatorTerm = 5
		_, err := h.srv.Assign(ctx, req)
		require.NoError(t, err)
		b, err := os.ReadFile(filepath.Join(h.dir, stateFile))
		require.NoError(t, err)
		require.Contains(t, string(b), `"coordinator_term": 5`)

		_, err = h.srv.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g1", Epoch: 1, CoordinatorTerm: 4})
		require.Equal(t, codes.Aborted, status.Code(err))
		require.ErrorContains(t, err, "deposed coordinator leader: its Raft term 4 is older than term 5")
		_, err = h.srv.Drain(ctx, &agentv1.DrainRequest{GroupId: "g1", Epoch: 1, CoordinatorTerm: 3})
		require.ErrorContains(t, err, "deposed")
		old := oneNode("g1", 2)
		old.CoordinatorTerm = 4
		_, err = h.srv.Assign(ctx, old)
		require.ErrorContains(t, err, "deposed")
		require.Equal(t, "g1", h.status().Assignment.GetGroupId())
		require.False(t, h.status().Draining, "the refused drain did nothing")
		require.Equal(t, uint64(1), h.status().Assignment.GetEpoch(), "the refused assign did nothing")

		// The new leader's term is obeyed and raises the fence.
		_, err = h.srv.Release(ctx, &agentv1.ReleaseRequest{GroupId: "g1", Epoch: 1, CoordinatorTerm: 6})
		require.NoError(t, err)
		synctest.Wait() // the loop publishes the status after the release it answered
		require.Nil(t, h.status().Assignment)
		again := oneNode("g2", 1)
		again.CoordinatorTerm = 5
		_, err = h.srv.Assign(ctx, again)
		require.ErrorContains(t, err, "older than term 6")
	})
}

// TestReplicaStreamCarriesRouterRetries: the deployment's router.retries
// reaches routers on the head's Replica stream.
func TestReplicaStreamCarriesRouterRetries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		req := oneNode("g1", 1)
		var d spec.Deployment
		require.NoError(t, json.Unmarshal(req.Assignment.SpecJson, &d))
		n := 4
		d.Router = &spec.Router{Retries: &n}
		req.Assignment.SpecJson = d.JSON()
		_, err := h.srv.Assign(context.Background(), req)
		require.NoError(t, err)
		until(t, 5*time.Second, func() bool { return h.rep.metrics().GetRouterRetries() == 4 }, "router_retries on the stream")
	})
}

func TestDrainIsAdvertisedAndPersisted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		ctx := context.Background()
		_, err := h.srv.Assign(ctx, oneNode("g1", 1))
		require.NoError(t, err)
		until(t, 5*time.Second, func() bool { return h.status().EngineState == gossip.EngineReady }, "ready")
		_, err = h.srv.Drain(ctx, &agentv1.DrainRequest{GroupId: "g1", Epoch: 2})
		require.ErrorContains(t, err, "not in group g1 at epoch 2")
		_, err = h.srv.Drain(ctx, &agentv1.DrainRequest{GroupId: "g1", Epoch: 1})
		require.NoError(t, err)
		require.True(t, h.status().Draining)
		until(t, time.Second, func() bool { return h.mem.Local().Draining && h.rep.metrics().GetDraining() }, "the tag and the Replica stream say draining")
		require.True(t, h.rep.metrics().GetServing(), "in-flight requests still finish")
		b, err := os.ReadFile(filepath.Join(h.dir, stateFile))
		require.NoError(t, err)
		require.Contains(t, string(b), `"draining": true`, "a restarted agent keeps draining")
	})
}

func TestAnIdleAgentWakesOnlyOnEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		synctest.Wait()
		before := h.mem.setCount()
		time.Sleep(time.Hour)
		require.LessOrEqual(t, h.mem.setCount()-before, 1, "no tick: an hour without events is (almost) no work")
		h.mem.mu.Lock()
		h.mem.others["n2"] = gossip.Tag{Kind: gossip.KindAgent, ID: "n2"}
		h.mem.mu.Unlock()
		h.mem.changes <- struct{}{}
		synctest.Wait()
		require.Greater(t, h.mem.setCount(), before, "a gossip change wakes it")
	})
}

func TestUnhealthyGPUFailsTheRunAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, &fakeRT{})
		ctx := context.Background()
		_, err := h.srv.Assign(ctx, oneNode("g1", 1))
		require.NoError(t, err)
		until(t, 5*time.Second, func() bool { return h.status().EngineState == gossip.EngineReady }, "ready")
		require.NoError(t, h.a.do(ctx, func() error {
			hw := h.a.hw.clone()
			hw.Events = append(hw.Events, gpu.Event{Index: 3, Reason: "Xid 79 (GPU fell off the bus)", Critical: true})
			hw.markEvents()
			h.a.setHardware(hw)
			return nil
		}))
		until(t, time.Second, func() bool { return h.status().EngineState == gossip.EngineFailed }, "the run fails")
		require.Contains(t, h.status().Message, "node unhealthy: GPU 3: Xid 79")
		require.False(t, h.mem.Local().Healthy)
		require.False(t, h.rep.metrics().GetServing())
		until(t, 5*time.Second, func() bool { return fmt.Sprint(h.rt.log()) == "[start ray start vllm stop vllm stop ray]" }, "the engines stop")
	})
}
