package engine

import (
	"fmt"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

func seedSpec(t *testing.T) *spec.Deployment {
	t.Helper()
	d, err := spec.Parse([]byte(`
apiVersion: shoal/v1
kind: Deployment
name: deepseek-r1
model:
  source: s3://models/deepseek-r1
  path: /models/deepseek-r1
engine:
  kind: ray-vllm
  servedModelName: deepseek-r1-671b
  tensorParallelSize: 8
  pipelineParallelSize: 2
  args: ["--trust-remote-code"]
  env: {NCCL_SOCKET_IFNAME: eth0}
resources: {nodes: 2, gpusPerNode: 8, gpuModel: H200}
replicas: {min: 1, max: 4}
`))
	require.NoError(t, err)
	return d
}

func TestRayVLLMHead(t *testing.T) {
	p, err := RayVLLM(PlanInput{Spec: seedSpec(t), Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1",
		BindHost: "0.0.0.0", Bin: Binaries{Ray: "/usr/bin/ray", VLLM: "/usr/bin/vllm"}, Env: map[string]string{"GLOO_SOCKET_IFNAME": "eth0"}})
	require.NoError(t, err)
	require.Equal(t, []string{"ray", "start", "--head", "--node-ip-address=10.0.0.1", "--port=6379", "--num-gpus=8",
		"--disable-usage-stats", "--block"}, p.Node.Argv())
	require.Equal(t, "/usr/bin/ray", p.Node.Path)
	require.Equal(t, []string{"GLOO_SOCKET_IFNAME=eth0", "NCCL_SOCKET_IFNAME=eth0", "RAY_NODE_IP_ADDRESS=10.0.0.1",
		"RAY_OVERRIDE_NODE_IP_ADDRESS=10.0.0.1", "VLLM_HOST_IP=10.0.0.1"}, p.Node.Env)
	require.NotNil(t, p.Serve)
	require.Equal(t, []string{"vllm", "serve", "/models/deepseek-r1", "--served-model-name", "deepseek-r1-671b",
		"--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
		"--distributed-executor-backend", "ray", "--kv-events-config", `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:18000","replay_endpoint":"tcp://127.0.0.1:18001","topic":"kv-events"}`,
		"--prefix-caching-hash-algo", "sha256_cbor", "--trust-remote-code"}, p.Serve.Argv())
	require.Equal(t, &KVEvents{Endpoint: "tcp://127.0.0.1:18000", Replay: "tcp://127.0.0.1:18001", Topic: "kv-events", Algo: "sha256_cbor",
		Seed: p.KVEvents.Seed, BlockSize: 16}, p.KVEvents)
	require.Contains(t, p.Serve.Env, "PYTHONHASHSEED="+p.KVEvents.Seed, "the engine names blocks under the seed routers are told")
	require.NotContains(t, strings.Join(p.Node.Env, " "), "PYTHONHASHSEED", "ray start does not need it")
	require.Contains(t, p.Serve.Env, "RAY_ADDRESS=10.0.0.1:6379")
	require.Contains(t, p.Serve.Env, "VLLM_HOST_IP=10.0.0.1")
	require.Equal(t, 16, p.ExpectedGPUs)
	require.Equal(t, "10.0.0.1:8000", p.Endpoint)
}

func TestRayVLLMWorker(t *testing.T) {
	p, err := RayVLLM(PlanInput{Spec: seedSpec(t), Role: RoleWorker, NodeIP: "10.0.0.2", HeadIP: "10.0.0.1",
		Bin: Binaries{Ray: "ray", VLLM: "vllm"}})
	require.NoError(t, err)
	require.Equal(t, []string{"ray", "start", "--address=10.0.0.1:6379", "--node-ip-address=10.0.0.2", "--num-gpus=8",
		"--disable-usage-stats", "--block"}, p.Node.Argv())
	require.Contains(t, p.Node.Env, "VLLM_HOST_IP=10.0.0.2")
	require.Contains(t, p.Node.Env, "RAY_NODE_IP_ADDRESS=10.0.0.2")
	require.Nil(t, p.Serve)
}

func TestRayVLLMBadInput(t *testing.T) {
	s := seedSpec(t)
	for name, in := range map[string]PlanInput{
		"no spec":       {Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1"},
		"bad ip":        {Spec: s, Role: RoleHead, NodeIP: "host-a", HeadIP: "10.0.0.1"},
		"head mismatch": {Spec: s, Role: RoleHead, NodeIP: "10.0.0.2", HeadIP: "10.0.0.1"},
		"bad role":      {Spec: s, Role: "boss", NodeIP: "10.0.0.1", HeadIP: "10.0.0.1"},
	} {
		_, err := RayVLLM(in)
		require.Error(t, err, name)
	}
}

func TestModelArg(t *testing.T) {
	s := &spec.Deployment{Model: spec.Model{Source: "hf://deepseek-ai/DeepSeek-R1@main"}}
	require.Equal(t, "deepseek-ai/DeepSeek-R1", ModelArg(s))
	s.Model.Path = "/m"
	require.Equal(t, "/m", ModelArg(s))
}

const rayStatusOut = `======== Autoscaler status: 2025-01-01 00:00:00.000000 ========
Node status
---------------------------------------------------------------
Active:
 1 node_4f1c
 1 node_9a2b
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Usage:
 0.0/64.0 CPU
 0.0/16.0 GPU
 0B/1.00TiB memory

Demands:
 (no resource demands)
`

func TestParseRayStatus(t *testing.T) {
	st, err := ParseRayStatus(rayStatusOut)
	require.NoError(t, err)
	require.Equal(t, RayStatus{ActiveNodes: 2, UsedGPUs: 0, TotalGPUs: 16}, st)

	_, err = ParseRayStatus("ConnectionError: could not find any running Ray instance")
	require.Error(t, err)
	_, err = ParseRayStatus("Usage:\n x/16.0 GPU\n")
	require.Error(t, err)
}

func nativeSpec(t *testing.T, kind string, tp, pp int) *spec.Deployment {
	t.Helper()
	d, err := spec.Parse([]byte(fmt.Sprintf(`apiVersion: shoal/v1
name: r1
model: {source: /models/r1}
engine: {kind: %s, servedModelName: r1, tensorParallelSize: %d, pipelineParallelSize: %d, args: ["--trust-remote-code"], env: {NCCL_IB_HCA: "mlx5_1:1"}}
resources: {nodes: 2, gpusPerNode: 8}
`, kind, tp, pp)))
	require.NoError(t, err)
	return d
}

// TestNativePlans: the exact argv per rank of vLLM native multi-node
// (reference §A2) and SGLang (§A3).
func TestNativePlans(t *testing.T) {
	bin := Binaries{VLLM: "/usr/bin/vllm", Python: "/usr/bin/python3"}
	head := PlanInput{Spec: nativeSpec(t, "vllm", 8, 2), Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1", Bin: bin, Env: map[string]string{"NCCL_SOCKET_IFNAME": "eth0"}}
	p, err := NativePlan(head, 0)
	require.NoError(t, err)
	require.Equal(t, []string{"vllm", "serve", "/models/r1", "--served-model-name", "r1", "--tensor-parallel-size", "8",
		"--pipeline-parallel-size", "2", "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29500",
		"--host", "10.0.0.1", "--port", "8000", "--kv-events-config", `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:18000","replay_endpoint":"tcp://127.0.0.1:18001","topic":"kv-events"}`,
		"--prefix-caching-hash-algo", "sha256_cbor", "--trust-remote-code"}, p.Node.Argv())
	require.Equal(t, []string{"NCCL_IB_HCA=mlx5_1:1", "NCCL_SOCKET_IFNAME=eth0", "PYTHONHASHSEED=" + p.KVEvents.Seed, "VLLM_HOST_IP=10.0.0.1"}, p.Node.Env)
	require.Equal(t, "10.0.0.1:8000", p.Endpoint)
	require.False(t, p.RayStop)
	require.Zero(t, p.ExpectedGPUs, "no Ray GPU gate")

	worker := head
	worker.Role, worker.NodeIP = RoleWorker, "10.0.0.2"
	p, err = NativePlan(worker, 1)
	require.NoError(t, err)
	require.Equal(t, []string{"vllm", "serve", "/models/r1", "--served-model-name", "r1", "--tensor-parallel-size", "8",
		"--pipeline-parallel-size", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500",
		"--headless", "--trust-remote-code"}, p.Node.Argv(), "identical engine args on every node; rank 1 is headless")
	require.Contains(t, p.Node.Env, "VLLM_HOST_IP=10.0.0.2")
	require.Empty(t, p.Endpoint)

	sg := PlanInput{Spec: nativeSpec(t, "sglang", 16, 1), Role: RoleWorker, NodeIP: "10.0.0.2", HeadIP: "10.0.0.1", Bin: bin}
	p, err = NativePlan(sg, 1)
	require.NoError(t, err)
	require.Equal(t, "/usr/bin/python3", p.Node.Path)
	sgKV := []string{"--kv-events-config", `{"publisher":"zmq","endpoint":"tcp://127.0.0.1:18000","replay_endpoint":"tcp://127.0.0.1:18001","topic":"kv-events"}`,
		"--page-size", "16"}
	require.Equal(t, append(append([]string{"python3", "-m", "sglang.launch_server", "--model-path", "/models/r1", "--served-model-name", "r1",
		"--tp", "16", "--dist-init-addr", "10.0.0.1:29500", "--nnodes", "2", "--node-rank", "1", "--host", "10.0.0.2",
		"--port", "8000", "--enable-metrics"}, sgKV...), "--trust-remote-code"), p.Node.Argv(), "every rank the same flags (only TP rank 0 publishes)")
	require.Nil(t, p.KVEvents, "a worker relays nothing")
	sg.Role, sg.NodeIP = RoleHead, "10.0.0.1"
	p, err = NativePlan(sg, 0)
	require.NoError(t, err)
	require.Equal(t, &KVEvents{Endpoint: "tcp://127.0.0.1:18000", Replay: "tcp://127.0.0.1:18001", Topic: "kv-events", Algo: "sglang_page_sha256", BlockSize: 16}, p.KVEvents,
		"SGLang's page chain needs no seed: no PYTHONHASHSEED is set")
	require.NotContains(t, strings.Join(p.Node.Env, " "), "PYTHONHASHSEED")
	own := nativeSpec(t, "sglang", 16, 1)
	own.Engine.Args = append(own.Engine.Args, "--page-size", "64")
	sg.Spec = own
	p, err = NativePlan(sg, 0)
	require.NoError(t, err)
	require.Equal(t, 64, p.KVEvents.BlockSize, "the user's page size is the block size")
	require.Equal(t, 1, strings.Count(strings.Join(p.Node.Argv(), " "), "--page-size"), "and shoal adds none of its own")

	_, err = NativePlan(PlanInput{Spec: seedSpec(t), Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1"}, 0)
	require.Error(t, err, "ray-vllm is not native")
}

// TestCommandPlan: templates are filled per rank; an unknown variable is an error.
func TestCommandPlan(t *testing.T) {
	d, err := spec.Parse([]byte(`apiVersion: shoal/v1
name: tp
model: {source: /m}
engine: {kind: command, command: ["python3", "engine.py", "--rank={{.Rank}}"], env: {MASTER_ADDR: "{{.HeadAddr}}", MASTER_PORT: "{{.MasterPort}}", WORLD_SIZE: "{{.NNodes}}"}}
resources: {nodes: 2, gpusPerNode: 1}
`))
	require.NoError(t, err)
	p, err := CommandPlan(PlanInput{Spec: d, Role: RoleWorker, NodeIP: "10.0.0.2", HeadIP: "10.0.0.1", Env: map[string]string{"CUDA_VISIBLE_DEVICES": "GPU-x"}}, 1)
	require.NoError(t, err)
	require.Equal(t, []string{"python3", "engine.py", "--rank=1"}, p.Node.Argv())
	require.Equal(t, []string{"CUDA_VISIBLE_DEVICES=GPU-x", "MASTER_ADDR=10.0.0.1", "MASTER_PORT=29500", "WORLD_SIZE=2"}, p.Node.Env)
	d.Engine.Command = []string{"run", "{{.Nope}}"}
	require.ErrorContains(t, ValidateTemplates(d), "engine.command[1]")
	d.Engine.Command = []string{"run", "{{.Rank"}
	require.Error(t, ValidateTemplates(d))
}

// TestCommandPlanKVTransfer: a command engine with kvTransfer gets its role,
// failure policy and side-channel port as template variables, and the
// NixlConnector side-channel environment the vLLM kinds get; the user's own
// value of a variable wins.
func TestCommandPlanKVTransfer(t *testing.T) {
	d, err := spec.Parse([]byte(`apiVersion: shoal/v1
name: pd
engine:
  kind: command
  command: ["python3", "engine.py", "--role={{.KVRole}}"]
  kvTransfer: {connector: nixl, role: decode, failurePolicy: recompute, sideChannelPort: 5700}
  env: {POLICY: "{{.KVFailurePolicy}}", SIDE: "{{.SideChannelPort}}"}
resources: {nodes: 1, gpusPerNode: 1}
`))
	require.NoError(t, err)
	p, err := CommandPlan(PlanInput{Spec: d, Role: RoleHead, NodeIP: "10.0.0.2", HeadIP: "10.0.0.2"}, 0)
	require.NoError(t, err)
	require.Equal(t, []string{"python3", "engine.py", "--role=decode"}, p.Node.Argv())
	require.Subset(t, p.Node.Env, []string{"POLICY=recompute", "SIDE=5700",
		"VLLM_NIXL_SIDE_CHANNEL_HOST=10.0.0.2", "VLLM_NIXL_SIDE_CHANNEL_PORT=5700"})
	d.Engine.Env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "10.9.9.9"
	p, err = CommandPlan(PlanInput{Spec: d, Role: RoleHead, NodeIP: "10.0.0.2", HeadIP: "10.0.0.2"}, 0)
	require.NoError(t, err)
	require.Contains(t, p.Node.Env, "VLLM_NIXL_SIDE_CHANNEL_HOST=10.9.9.9")
	require.NotContains(t, p.Node.Env, "VLLM_NIXL_SIDE_CHANNEL_HOST=10.0.0.2")
}

// TestKVEventsSetUp: the head's KV-event set-up follows the spec, and the
// user's own flags or engine.kvEvents: false leave the engine's command line
// as it was.
func TestKVEventsSetUp(t *testing.T) {
	in := func(mut func(d *spec.Deployment)) *Plan {
		d := seedSpec(t)
		mut(d)
		p, err := RayVLLM(PlanInput{Spec: d, Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1", Bin: Binaries{Ray: "ray", VLLM: "vllm"}})
		require.NoError(t, err)
		return p
	}
	p := in(func(d *spec.Deployment) {})
	// fnv-1a 32 of the deployment's name (python3: a loop of xor and
	// multiply by 16777619 from 2166136261), so every replica agrees.
	require.Equal(t, "870248051", p.KVEvents.Seed)
	p = in(func(d *spec.Deployment) { d.Engine.Env["PYTHONHASHSEED"] = "7" })
	require.Equal(t, "7", p.KVEvents.Seed, "the user's seed is the seed")
	p = in(func(d *spec.Deployment) {
		d.Engine.KVEventsPort = 20500
		d.Engine.Args = append(d.Engine.Args, "--block-size", "64")
	})
	require.Equal(t, "tcp://127.0.0.1:20500", p.KVEvents.Endpoint)
	require.Equal(t, "tcp://127.0.0.1:20501", p.KVEvents.Replay)
	require.Equal(t, 64, p.KVEvents.BlockSize)
	off := false
	for name, mut := range map[string]func(d *spec.Deployment){
		"kvEvents false":    func(d *spec.Deployment) { d.Engine.KVEvents = &off },
		"own events config": func(d *spec.Deployment) { d.Engine.Args = append(d.Engine.Args, "--kv-events-config={}") },
		"own hash algorithm": func(d *spec.Deployment) {
			d.Engine.Args = append(d.Engine.Args, "--prefix-caching-hash-algo", "xxhash")
		},
		"no prefix caching": func(d *spec.Deployment) { d.Engine.Args = append(d.Engine.Args, "--no-enable-prefix-caching") },
	} {
		p := in(mut)
		require.Nil(t, p.KVEvents, name)
		require.NotContains(t, strings.Join(p.Serve.Argv(), " "), `"enable_kv_cache_events":true`, name)
		require.NotContains(t, strings.Join(p.Serve.Env, " "), "PYTHONHASHSEED", name)
	}
}

// A node in a Slurm job's port band (band 3: +300): the spec's ports come
// shifted (spec.ShiftPorts, as the agent does), Ray's own fixed ports move
// by the same offset, and `ray stop --force` (every Ray on the host) is not
// run.
func TestRayVLLMPortBand(t *testing.T) {
	s := spec.ShiftPorts(seedSpec(t), 300)
	head, err := RayVLLM(PlanInput{Spec: s, Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1", Bin: Binaries{Ray: "ray", VLLM: "vllm"}, PortOffset: 300})
	require.NoError(t, err)
	require.Equal(t, []string{"ray", "start", "--head", "--node-ip-address=10.0.0.1", "--port=6679", "--dashboard-agent-listen-port=52665",
		"--dashboard-port=8565", "--ray-client-server-port=10301", "--num-gpus=8", "--disable-usage-stats", "--block"}, head.Node.Argv())
	require.False(t, head.RayStop)
	require.Equal(t, "10.0.0.1:8300", head.Endpoint)
	require.Contains(t, strings.Join(head.Serve.Argv(), " "), "--port 8300")
	require.Contains(t, strings.Join(head.Serve.Argv(), " "), `"endpoint":"tcp://127.0.0.1:18300"`)
	require.Contains(t, head.Serve.Env, "RAY_ADDRESS=10.0.0.1:6679")
	w, err := RayVLLM(PlanInput{Spec: s, Role: RoleWorker, NodeIP: "10.0.0.2", HeadIP: "10.0.0.1", Bin: Binaries{Ray: "ray", VLLM: "vllm"}, PortOffset: 300})
	require.NoError(t, err)
	require.Equal(t, []string{"ray", "start", "--address=10.0.0.1:6679", "--node-ip-address=10.0.0.2", "--dashboard-agent-listen-port=52665",
		"--num-gpus=8", "--disable-usage-stats", "--block"}, w.Node.Argv())
}
