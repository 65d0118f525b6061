package engine

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden command lines in testdata/")

func dpSpec(t *testing.T, kind, engine string) *spec.Deployment {
	t.Helper()
	d, err := spec.Parse([]byte(fmt.Sprintf(`apiVersion: shoal/v1
name: r1
model: {source: /models/r1}
engine: {kind: %s, servedModelName: deepseek-r1, args: [--trust-remote-code], %s}
resources: {nodes: 2, gpusPerNode: 8}
`, kind, engine)))
	require.NoError(t, err)
	return d
}

// render is a plan's processes as a user would read them: env, then argv,
// one process per block; the head's API servers last.
func renderPlan(p *Plan) string {
	var b strings.Builder
	for _, c := range append([]Command{p.Node}, p.Extra...) {
		fmt.Fprintf(&b, "%s\n  %s\n", strings.Join(c.Env, " "), strings.Join(c.Argv(), " "))
	}
	if p.Endpoint != "" {
		fmt.Fprintf(&b, "endpoint %s\n", p.Endpoint)
	}
	for _, s := range p.APIServers {
		fmt.Fprintf(&b, "api server %s ranks %d-%d pin=%v\n", s.Addr, s.FirstRank, s.FirstRank+s.Ranks-1, s.PinRanks)
	}
	return b.String()
}

// TestDataParallelGolden: the exact command lines per engine kind, load
// balancing mode and node rank (engine/testdata/dp/*.golden; `go test
// ./engine -run DataParallelGolden -update` rewrites them).
func TestDataParallelGolden(t *testing.T) {
	ep := "expertParallel: {enabled: true, all2allBackend: %s, eplb: {windowSize: 1000, stepInterval: 3000, redundantExperts: 32}}"
	cases := map[string]*spec.Deployment{
		"vllm-internal":     dpSpec(t, "vllm", "dataParallel: {size: 16}, "+fmt.Sprintf(ep, "deepep_low_latency")),
		"vllm-internal-api": dpSpec(t, "vllm", "dataParallel: {size: 16, apiServers: 4}, expertParallel: {enabled: true}"),
		"vllm-hybrid":       dpSpec(t, "vllm", "dataParallel: {size: 16, loadBalancing: hybrid}, "+fmt.Sprintf(ep, "deepep_low_latency")),
		"vllm-external":     dpSpec(t, "vllm", "tensorParallelSize: 2, dataParallel: {size: 8, loadBalancing: external, rpcPort: 13345}, expertParallel: {enabled: true}"),
		"sglang-internal":   dpSpec(t, "sglang", "dataParallel: {size: 16}, "+fmt.Sprintf(ep, "deepep")),
		"vllm-ep-only":      dpSpec(t, "vllm", "tensorParallelSize: 8, pipelineParallelSize: 2, expertParallel: {enabled: true}"),
	}
	ips := []string{"10.0.0.1", "10.0.0.2"}
	rdmaEnv := map[string]string{"NCCL_IB_HCA": "mlx5_0:1,mlx5_1:1", "NCCL_IB_DISABLE": "0", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}
	bin := Binaries{VLLM: "/usr/bin/vllm", Python: "/usr/bin/python3"}
	for name, d := range cases {
		for rank, ip := range ips {
			role := RoleHead
			if rank > 0 {
				role = RoleWorker
			}
			t.Run(fmt.Sprintf("%s-rank%d", name, rank), func(t *testing.T) {
				p, err := NativePlan(PlanInput{Spec: d, Role: role, NodeIP: ip, HeadIP: ips[0], Epoch: 1, Term: 1, MemberIPs: ips, Bin: bin,
					Env: mergeEnv(rdmaEnv, nil)}, rank)
				require.NoError(t, err)
				got := renderPlan(p)
				path := filepath.Join("testdata", "dp", fmt.Sprintf("%s-rank%d.golden", name, rank))
				if *update {
					require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
					require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
				}
				want, err := os.ReadFile(path)
				require.NoError(t, err, "run with -update to write it")
				require.Equal(t, string(want), got)
			})
		}
	}
}

// The rules the golden files show, asserted on their own.
func TestDataParallelPlanRules(t *testing.T) {
	ips := []string{"10.0.0.1", "10.0.0.2"}
	bin := Binaries{VLLM: "/usr/bin/vllm"}
	hybrid := dpSpec(t, "vllm", "dataParallel: {size: 16, loadBalancing: hybrid}")
	plan := func(d *spec.Deployment, rank int, epoch uint64) *Plan {
		role := RoleHead
		if rank > 0 {
			role = RoleWorker
		}
		p, err := NativePlan(PlanInput{Spec: d, Role: role, NodeIP: ips[rank], HeadIP: ips[0], Epoch: epoch, Term: 1, MemberIPs: ips, Bin: bin}, rank)
		require.NoError(t, err)
		return p
	}
	argv := func(p *Plan) string { return strings.Join(p.Node.Argv(), " ") }
	require.Contains(t, argv(plan(hybrid, 1, 1)), "--data-parallel-start-rank 8 --data-parallel-address 10.0.0.1 --data-parallel-rpc-port 29550",
		"node 1 starts at rank 8 and meets the head")
	require.Contains(t, argv(plan(hybrid, 1, 3)), "--data-parallel-rpc-port 29552", "a re-formed group moves to a fresh port")
	require.NotContains(t, argv(plan(hybrid, 1, 1)), "--headless", "hybrid cannot be headless")
	require.Len(t, plan(hybrid, 0, 1).APIServers, 2)
	require.Empty(t, plan(hybrid, 1, 1).APIServers, "only the head tells routers")

	ext := dpSpec(t, "vllm", "tensorParallelSize: 4, dataParallel: {size: 4, loadBalancing: external}")
	p := plan(ext, 1, 1)
	require.Len(t, p.Extra, 1, "two ranks of TP4 on the node: two processes")
	require.Contains(t, p.Extra[0].Env, "CUDA_VISIBLE_DEVICES=4,5,6,7")
	require.Contains(t, argv(p), "--data-parallel-rank 2")

	// The agent's own GPU subset is sliced per rank.
	pv, err := NativePlan(PlanInput{Spec: ext, Role: RoleWorker, NodeIP: ips[1], HeadIP: ips[0], Epoch: 1, MemberIPs: ips, Bin: bin,
		Env: map[string]string{"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c,GPU-d,GPU-e,GPU-f,GPU-g,GPU-h"}}, 1)
	require.NoError(t, err)
	require.Contains(t, pv.Node.Env, "CUDA_VISIBLE_DEVICES=GPU-a,GPU-b,GPU-c,GPU-d")
	require.Contains(t, pv.Extra[0].Env, "CUDA_VISIBLE_DEVICES=GPU-e,GPU-f,GPU-g,GPU-h")

	_, err = NativePlan(PlanInput{Spec: hybrid, Role: RoleWorker, NodeIP: ips[1], HeadIP: ips[0], Epoch: 1, Bin: bin}, 1)
	require.ErrorContains(t, err, "every member's address")
	_, err = NativePlan(PlanInput{Spec: hybrid, Role: RoleWorker, NodeIP: "10.0.0.9", HeadIP: ips[0], Epoch: 1, MemberIPs: ips, Bin: bin}, 1)
	require.ErrorContains(t, err, "do not agree")
}

// TestKVTransferGolden: the command lines of disaggregated engines
// (engine/testdata/pd/*.golden), a prefill engine of TP8 on one node, a
// decode group of DP16 over two, and a ray-vllm head.
func TestKVTransferGolden(t *testing.T) {
	one := func(kind, engine string) *spec.Deployment {
		d, err := spec.Parse([]byte(fmt.Sprintf("apiVersion: shoal/v1\nname: r1-%s\nmodel: {source: /models/r1}\nengine: {kind: %s, servedModelName: r1, %s}\nresources: {nodes: 1, gpusPerNode: 8}\n",
			kind, kind, engine)))
		require.NoError(t, err)
		return d
	}
	cases := []struct {
		name string
		d    *spec.Deployment
		ips  []string
	}{
		{"vllm-prefill", one("vllm", "kvTransfer: {connector: nixl, role: prefill, leaseSeconds: 60}"), []string{"10.0.0.1"}},
		{"ray-vllm-prefill", one("ray-vllm", "kvTransfer: {connector: nixl, role: prefill}"), []string{"10.0.0.1"}},
		{"vllm-decode-dp", dpSpec(t, "vllm", "dataParallel: {size: 16, loadBalancing: hybrid}, expertParallel: {enabled: true}, kvTransfer: {connector: nixl, role: decode, failurePolicy: recompute}"),
			[]string{"10.0.0.1", "10.0.0.2"}},
		{"sglang-prefill", one("sglang", "tensorParallelSize: 8, kvTransfer: {connector: mooncake, role: prefill}"), []string{"10.0.0.1"}},
		{"sglang-decode-dp", dpSpec(t, "sglang", "dataParallel: {size: 16}, expertParallel: {enabled: true, all2allBackend: deepep}, kvTransfer: {connector: nixl, role: decode}"),
			[]string{"10.0.0.1", "10.0.0.2"}},
	}
	rdmaEnv := map[string]string{"NCCL_IB_HCA": "mlx5_0:1,mlx5_1:1", "NCCL_IB_DISABLE": "0", "NCCL_SOCKET_IFNAME": "ib0"}
	bin := Binaries{VLLM: "/usr/bin/vllm", Ray: "/usr/bin/ray", Python: "/usr/bin/python3"}
	for _, tc := range cases {
		for rank, ip := range tc.ips {
			role := RoleHead
			if rank > 0 {
				role = RoleWorker
			}
			t.Run(fmt.Sprintf("%s-rank%d", tc.name, rank), func(t *testing.T) {
				in := PlanInput{Spec: tc.d, Role: role, NodeIP: ip, HeadIP: tc.ips[0], Epoch: 1, Term: 1, MemberIPs: tc.ips, Bin: bin, Env: mergeEnv(rdmaEnv, nil)}
				var p *Plan
				var err error
				if tc.d.Engine.Kind == spec.EngineRayVLLM {
					p, err = RayVLLM(in)
				} else {
					p, err = NativePlan(in, rank)
				}
				require.NoError(t, err)
				got := renderPlan(p)
				if p.Serve != nil {
					got += fmt.Sprintf("serve: %s\n  %s\n", strings.Join(p.Serve.Env, " "), strings.Join(p.Serve.Argv(), " "))
				}
				path := filepath.Join("testdata", "pd", fmt.Sprintf("%s-rank%d.golden", tc.name, rank))
				if *update {
					require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
					require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
				}
				want, err := os.ReadFile(path)
				require.NoError(t, err, "run with -update to write it")
				require.Equal(t, string(want), got)
				if tc.d.Engine.Kind == spec.EngineSGLang {
					require.Contains(t, got, "--disaggregation-mode "+tc.d.Engine.KVTransfer.Role+" --disaggregation-transfer-backend "+tc.d.Engine.KVTransfer.Connector)
					require.Contains(t, got, "--disaggregation-ib-device mlx5_0,mlx5_1", "SGLang names devices without NCCL's port")
					require.Equal(t, tc.d.Engine.KVTransfer.Role == spec.RolePrefill, strings.Contains(got, "--disaggregation-bootstrap-port 8998"), "the bootstrap server is the prefill engine's")
					require.NotContains(t, got, "VLLM_NIXL")
					return
				}
				require.Contains(t, got, "VLLM_NIXL_SIDE_CHANNEL_HOST="+ip, "the side channel binds the node's own address, not localhost")
				require.Contains(t, got, `--kv-transfer-config {"kv_connector":"NixlConnector","kv_role":"kv_both"`)
			})
		}
	}
}

// Ray's workers inherit the raylet's environment, so a ray-vllm worker
// node's `ray start` carries the all-to-all's and the connector's settings
// for its own HCAs and address.
func TestRayWorkersGetTransferEnv(t *testing.T) {
	d, err := spec.Parse([]byte(`apiVersion: shoal/v1
name: r1
model: {source: /models/r1}
engine: {kind: ray-vllm, tensorParallelSize: 8, pipelineParallelSize: 2, expertParallel: {enabled: true}, kvTransfer: {connector: nixl, role: decode}}
resources: {nodes: 2, gpusPerNode: 8}
`))
	require.NoError(t, err)
	p, err := RayVLLM(PlanInput{Spec: d, Role: RoleWorker, NodeIP: "10.0.0.2", HeadIP: "10.0.0.1", Bin: Binaries{Ray: "/usr/bin/ray"},
		Env: map[string]string{"NCCL_IB_HCA": "mlx5_3:1", "NCCL_IB_DISABLE": "0", "NCCL_SOCKET_IFNAME": "ib0"}})
	require.NoError(t, err)
	for _, kv := range []string{"UCX_NET_DEVICES=mlx5_3:1", "NVSHMEM_HCA_LIST=mlx5_3:1", "VLLM_NIXL_SIDE_CHANNEL_HOST=10.0.0.2"} {
		require.Contains(t, p.Node.Env, kv)
	}
}

// Without RDMA the connector's UCX runs TCP on the interface of the node's
// own address (not whatever bridge UCX would pick), with the GPU copies.
func TestNIXLWithoutRDMA(t *testing.T) {
	d, err := spec.Parse([]byte("apiVersion: shoal/v1\nname: p\nmodel: {source: /m}\nengine: {kind: vllm, kvTransfer: {connector: nixl, role: prefill}}\nresources: {nodes: 1, gpusPerNode: 8}\n"))
	require.NoError(t, err)
	p, err := NativePlan(PlanInput{Spec: d, Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1", Bin: Binaries{VLLM: "/usr/bin/vllm"},
		Env: map[string]string{"NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "eth0"}}, 0)
	require.NoError(t, err)
	require.Contains(t, p.Node.Env, "UCX_NET_DEVICES=eth0")
	require.Contains(t, p.Node.Env, "UCX_TLS=tcp,cuda_copy,cuda_ipc")
}
