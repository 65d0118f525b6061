package agent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gpu"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/spec"
)

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

// The real Replica API over loopback: a watcher hears every update, the
// port closes on stop (and can be opened again at once), health follows.
func TestReplicaServer(t *testing.T) {
	addr := freeAddr(t)
	s := newReplicaServer(addr, quietLog, nil)
	s.update(&replicav1.Metrics{Serving: true}, nil, nil) // not head yet: nothing listens, nothing happens
	s.start()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := replicav1.NewReplicaClient(conn).Watch(ctx, &replicav1.SnapshotRequest{})
	require.NoError(t, err)
	first, err := stream.Recv()
	require.NoError(t, err)
	require.False(t, first.Serving, "a new head is not serving")
	hc := healthpb.NewHealthClient(conn)
	h, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: ReplicaService})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, h.Status)

	s.update(&replicav1.Metrics{Serving: true, Endpoint: "10.0.0.1:8000", Term: 3}, nil, nil)
	for {
		m, err := stream.Recv()
		require.NoError(t, err)
		if m.Serving {
			require.Equal(t, "10.0.0.1:8000", m.Endpoint)
			break
		}
	}
	h, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: ReplicaService})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, h.Status)
	snap, err := replicav1.NewReplicaClient(conn).Snapshot(ctx, &replicav1.SnapshotRequest{})
	require.NoError(t, err)
	require.Equal(t, uint64(3), snap.Term)

	s.stop()
	for {
		m, err := stream.Recv()
		if err != nil {
			break // the stream ends with the server
		}
		require.False(t, m.Serving, "nothing after the stop says serving")
	}
	s.start() // claimed again right away: the port is free at once
	s.stop()
	s.wait()
}

func TestAssignmentFromProto(t *testing.T) {
	d := &spec.Deployment{APIVersion: spec.APIVersion, Name: "d", Model: spec.Model{Source: "/m"}, Resources: spec.Resources{Nodes: 2, GPUsPerNode: 8, GPUModel: "H200"}}
	d.Default()
	inv := &gpu.Inventory{Devices: make([]gpu.Device, 8)}
	for i := range inv.Devices {
		inv.Devices[i] = gpu.Device{Index: i, Name: "NVIDIA H200", Healthy: true}
	}
	members := func(ms ...*agentv1.Member) []*agentv1.Member { return ms }
	ok := &agentv1.Assignment{Deployment: "d", GroupId: "g", Epoch: 1, Rank: 1, SpecJson: d.JSON(),
		Members: members(&agentv1.Member{NodeId: "a", GrpcAddr: "a:1"}, &agentv1.Member{NodeId: "n1", Rank: 1, GrpcAddr: "b:1"})}
	as, err := assignmentFromProto("n1", inv, ok)
	require.NoError(t, err)
	require.Equal(t, 1, as.Rank)
	require.Len(t, as.Members, 2)
	for name, c := range map[string]struct {
		mod  func(a *agentv1.Assignment)
		want string
	}{
		"no epoch":        {func(a *agentv1.Assignment) { a.Epoch = 0 }, "group_id and epoch > 0"},
		"not a member":    {func(a *agentv1.Assignment) { a.Members[1].NodeId = "n9" }, "this node (n1) is not a member at rank 1"},
		"duplicate rank":  {func(a *agentv1.Assignment) { a.Members[1].Rank = 0 }, "unique ids, unique ranks"},
		"wrong size":      {func(a *agentv1.Assignment) { a.Members = a.Members[1:]; a.Members[0].Rank = 1 }, "1 members for a 2-node replica"},
		"bad spec":        {func(a *agentv1.Assignment) { a.SpecJson = []byte("{") }, "invalid deployment spec"},
		"too few GPUs":    {func(a *agentv1.Assignment) { a.SpecJson = withGPUs(d, 16) }, "needs 16 GPUs per node, this node has 8"},
		"other GPU model": {func(a *agentv1.Assignment) { a.SpecJson = withModel(d, "B200") }, "needs B200 GPUs"},
	} {
		a := protoClone(ok)
		c.mod(a)
		_, err := assignmentFromProto("n1", inv, a)
		require.ErrorContains(t, err, c.want, name)
	}
}

func protoClone(a *agentv1.Assignment) *agentv1.Assignment {
	return proto.Clone(a).(*agentv1.Assignment)
}

func withGPUs(d *spec.Deployment, n int) []byte {
	c := *d
	c.Resources.GPUsPerNode, c.Engine.TensorParallelSize, c.Engine.PipelineParallelSize = n, n, 2
	return c.JSON()
}

func withModel(d *spec.Deployment, m string) []byte {
	c := *d
	c.Resources.GPUModel = m
	return c.JSON()
}

func TestHostInventoryHelpers(t *testing.T) {
	h := &HostInventory{GPU: &gpu.Inventory{Devices: []gpu.Device{
		{Index: 0, UUID: "GPU-a", MemoryMiB: 143771, Healthy: true},
		{Index: 1, UUID: "GPU-b", MemoryMiB: 81559, Healthy: true},
		{Index: 2, UUID: "GPU-c", MemoryMiB: 143771, Healthy: true}}}}
	require.Empty(t, h.unhealthy())
	require.Equal(t, 79, h.minMemGiB())
	c := h.clone()
	c.Events = append(c.Events, gpu.Event{Index: 2, Reason: "Xid 48 (double-bit ECC)", Critical: true})
	c.markEvents()
	require.Equal(t, "GPU 2: Xid 48 (double-bit ECC)", c.unhealthy())
	require.True(t, h.GPU.Devices[2].Healthy, "the clone is independent: the Status API may still read the old one")
	require.Empty(t, h.Events)
	c.markEvents()
	require.Len(t, c.GPU.Devices[2].Reasons, 1, "marking twice adds the reason once")

	byUUID := h.clone()
	require.NoError(t, h.own([]int{2, 0}, nil, nil))
	require.Equal(t, "GPU-c,GPU-a", h.Visible, "CUDA_VISIBLE_DEVICES in the agent's order")
	require.Len(t, h.GPU.Devices, 2)
	require.ErrorContains(t, (&HostInventory{GPU: &gpu.Inventory{}}).own([]int{0}, nil, nil), "index 0, but this host has 0 GPU(s)")
	// Slurm may name a step's GPUs by UUID (gres.conf), and say one twice.
	byMinor := byUUID.clone()
	require.NoError(t, byUUID.own([]int{1}, nil, []string{"GPU-c", "GPU-b"}))
	require.Equal(t, "GPU-b,GPU-c", byUUID.Visible)
	require.ErrorContains(t, byUUID.clone().own(nil, nil, []string{"GPU-z"}), `no GPU of this host has UUID "GPU-z"`)
	// Slurm's GPU ids are device numbers: under a device cgroup NVML sees
	// only the job's GPUs, numbered from 0, while the step says 6.
	cg := byMinor.clone()
	cg.GPU.Devices = cg.GPU.Devices[2:3]
	cg.GPU.Devices[0].Index, cg.GPU.Devices[0].Minor = 0, 6
	require.NoError(t, cg.own(nil, []int{6}, nil))
	require.Equal(t, "GPU-c", cg.Visible)
	require.ErrorContains(t, byMinor.clone().own(nil, []int{7}, nil), "no GPU of this host is /dev/nvidia7")
	unknown := byMinor.clone()
	for i := range unknown.GPU.Devices {
		unknown.GPU.Devices[i].Minor = -1
	}
	require.NoError(t, unknown.own(nil, []int{1}, nil), "no minor number from NVML: the index stands in")
	require.Equal(t, "GPU-b", unknown.Visible)
	require.Empty(t, (*HostInventory)(nil).unhealthy())
}

func TestStateStoreGenerations(t *testing.T) {
	dir := t.TempDir()
	s := newStateStore(dir, quietLog, State{NodeID: "n1"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	g1 := s.Save(State{NodeID: "n1", LastTerm: 1})
	g2 := s.Save(State{NodeID: "n1", LastTerm: 2})
	require.Greater(t, g2, g1)
	require.NoError(t, s.Wait(context.Background(), g1), "a later write covers an earlier generation")
	require.NoError(t, s.Wait(context.Background(), g2))
	got, err := LoadState(dir)
	require.NoError(t, err)
	require.Equal(t, uint64(2), got.LastTerm, "the newest state is on disk")
	info, err := os.Stat(filepath.Join(dir, stateFile))
	require.NoError(t, err)
	g3 := s.Save(State{NodeID: "n1", LastTerm: 2}) // the same again: not rewritten
	require.NoError(t, s.Wait(context.Background(), g3))
	info2, err := os.Stat(filepath.Join(dir, stateFile))
	require.NoError(t, err)
	require.Equal(t, info.ModTime(), info2.ModTime())
	cancel()
	<-done

	// A write that fails is the error of the call that waits for it.
	file := filepath.Join(t.TempDir(), "not-a-dir")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	bad := newStateStore(filepath.Join(file, "state"), quietLog, State{})
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	go bad.Run(ctx)
	err = bad.Wait(context.Background(), bad.Save(State{NodeID: "x"}))
	require.ErrorContains(t, err, "state dir")
	wctx, wcancel := context.WithCancel(context.Background())
	wcancel()
	require.ErrorIs(t, bad.Wait(wctx, 99), context.Canceled)
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	c := Config{NodeID: "n1", Address: "10.0.0.1"}
	c.Defaults()
	c.HangTimeout, c.MemberGrace = -time.Second, -2*time.Second
	err := c.Validate()
	require.ErrorContains(t, err, "hang_timeout: must not be negative, got -1s")
	require.ErrorContains(t, err, "member_grace: must not be negative, got -2s")
	require.NotContains(t, err.Error(), "stop_grace")
	p := filepath.Join(t.TempDir(), "agent.yaml")
	require.NoError(t, os.WriteFile(p, []byte("node_id: n1\ncolour: red\n"), 0o600))
	_, err = LoadConfigFile(p)
	require.ErrorContains(t, err, "field colour not found")
}

func TestNewRunPlansEachKind(t *testing.T) {
	dir := t.TempDir()
	ins, err := gpu.New("mock:h200x8")
	require.NoError(t, err)
	a, err := New(Config{NodeID: "n2", Address: "10.0.0.2", StateDir: dir, Logger: quietLog, VLLMBin: "/opt/vllm", RayBin: "/opt/ray"}, ins, nil)
	require.NoError(t, err)
	a.hw = &HostInventory{GPU: &gpu.Inventory{}, NCCLEnv: map[string]string{"NCCL_SOCKET_IFNAME": "eth0"}, Visible: "GPU-x"}
	as := func(kind, runtime string) *Assignment {
		d := &spec.Deployment{APIVersion: spec.APIVersion, Name: "d", Model: spec.Model{Source: "s3://bucket/llama"},
			Resources: spec.Resources{Nodes: 2, GPUsPerNode: 8}, Engine: spec.Engine{Kind: kind, Runtime: runtime, Image: "img:1", Command: nil}}
		if kind == spec.EngineCommand {
			d.Engine.Command = []string{"/bin/serve", "--rank", "{{.Rank}}", "--head", "{{.HeadAddr}}"}
		}
		d.Default()
		require.NoError(t, d.Validate(), kind)
		return &Assignment{Deployment: "d", Group: "g", Epoch: 3, Rank: 1, Spec: d,
			Members: []Member{{NodeID: "n1", GRPC: "10.0.0.1:7947"}, {NodeID: "n2", Rank: 1, GRPC: "10.0.0.2:7947"}}}
	}
	ar, err := a.newRun(as(spec.EngineRayVLLM, "process"), engine.RoleWorker, "n1", 5, "10.0.0.1")
	require.NoError(t, err)
	require.Equal(t, "ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2 --num-gpus=8 --disable-usage-stats --block",
		strings.Join(ar.plan.Node.Argv(), " "))
	require.Contains(t, ar.plan.Node.Env, "CUDA_VISIBLE_DEVICES=GPU-x", "this agent owns a subset of the host's GPUs")
	require.Contains(t, ar.plan.Node.Env, "NCCL_SOCKET_IFNAME=eth0")
	require.Equal(t, "/opt/ray", ar.plan.Node.Path)
	require.Equal(t, RunInfo{Group: "g", Epoch: 3, Term: 5, Head: "n1", Role: engine.RoleWorker}, ar.info)

	ar, err = a.newRun(as(spec.EngineVLLM, "process"), engine.RoleHead, "n2", 5, "10.0.0.2")
	require.NoError(t, err)
	require.Contains(t, strings.Join(ar.plan.Node.Argv(), " "), "--nnodes 2 --node-rank 0 --master-addr 10.0.0.2")
	require.Contains(t, strings.Join(ar.plan.Node.Argv(), " "), filepath.Join(dir, "models", "llama"), "the weights where this host keeps them")
	require.Equal(t, engine.CanaryCompletions, ar.plan.CanaryEndpoint())

	ar, err = a.newRun(as(spec.EngineCommand, "process"), engine.RoleWorker, "n1", 5, "10.0.0.1")
	require.NoError(t, err)
	require.Equal(t, "serve --rank 1 --head 10.0.0.1", strings.Join(ar.plan.Node.Argv(), " "), "the head is rank 0, this node 1")

	ar, err = a.newRun(as(spec.EngineRayVLLM, "containerd"), engine.RoleHead, "n2", 5, "10.0.0.2")
	require.NoError(t, err)
	require.Equal(t, "vllm", ar.plan.Serve.Path, "the image's own binaries")
	require.Equal(t, "img:1", ar.plan.Serve.Container.Image)
	require.Equal(t, map[string]string{"io.shoal.group": "g", "io.shoal.epoch": "3", "io.shoal.term": "5", "io.shoal.role": "head"}, ar.plan.Serve.Container.Labels)

	bad := as(spec.EngineRayVLLM, "process")
	_, err = a.newRun(bad, engine.RoleHead, "n1", 5, "not-an-ip")
	require.ErrorContains(t, err, "cannot plan engine")
}

func TestRunRank(t *testing.T) {
	as := &Assignment{Members: []Member{{NodeID: "c", Rank: 2}, {NodeID: "a", Rank: 0}, {NodeID: "b", Rank: 1}, {NodeID: "d", Rank: 3}}}
	for _, c := range []struct {
		head, self string
		want       int
	}{{"a", "a", 0}, {"a", "b", 1}, {"a", "d", 3}, {"c", "a", 1}, {"c", "b", 2}, {"c", "d", 3}, {"c", "c", 0}} {
		require.Equal(t, c.want, runRank(as, c.head, c.self), "head %s self %s", c.head, c.self)
	}
}

func TestModelFor(t *testing.T) {
	a := &Agent{cfg: Config{ModelsDir: "/var/lib/shoal/models"}}
	for _, c := range []struct {
		source, path string
		dir          string
		remote       bool
	}{
		{"s3://models/deepseek-r1", "", "/var/lib/shoal/models/deepseek-r1", true},
		{"hf://deepseek-ai/DeepSeek-R1@main", "", "/var/lib/shoal/models/DeepSeek-R1", true},
		{"s3://models/deepseek-r1", "/mnt/nvme/r1", "/mnt/nvme/r1", true},
		{"/mnt/shared/r1", "/mnt/shared/r1", "/mnt/shared/r1", false},
		{"/mnt/shared/r1", "", "/mnt/shared/r1", false},
		{"/mnt/shared/r1", "/local/nvme/r1", "/local/nvme/r1", false}, // model.path was ignored for a local source
	} {
		j, err := a.modelFor(&spec.Deployment{Model: spec.Model{Source: c.source, Path: c.path}})
		require.NoError(t, err, c.source)
		require.Equal(t, c.dir, j.dir, c.source)
		require.Equal(t, c.remote, j.remote, c.source)
	}
	j, err := a.modelFor(&spec.Deployment{})
	require.NoError(t, err)
	require.Nil(t, j, "a command engine without weights")
	_, err = a.modelFor(&spec.Deployment{Model: spec.Model{Source: "ftp://x"}})
	require.Error(t, err)
}
