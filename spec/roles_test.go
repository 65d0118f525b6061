package spec

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const rolesDoc = `apiVersion: shoal/v1
name: r1
model: {source: /models/r1}
engine: {kind: vllm, tensorParallelSize: 8, kvTransfer: {connector: nixl}, args: [--max-model-len, '32768']}
resources: {nodes: 1, gpusPerNode: 8}
roles:
  prefill:
    engine: {dataParallel: {size: 8}}
    replicas: {min: 1, max: 4}
    autoscaling: {policy: kpa, metric: num_requests_waiting, target: 4}
  decode:
    engine: {dataParallel: {size: 16, loadBalancing: hybrid}, expertParallel: {enabled: true}, env: {A: b}}
    resources: {nodes: 2, gpusPerNode: 8}
    replicas: {count: 2}
  ratio: {min: 0.5, max: 2}
`

// A deployment with roles is two deployments: each role's parallelism,
// nodes and replicas, the shared model, engine and connector, the role
// set; served under one model name.
func TestRoleDeployments(t *testing.T) {
	d, err := Parse([]byte(rolesDoc))
	require.NoError(t, err)
	p, dc := d.RoleDeployment(RolePrefill), d.RoleDeployment(RoleDecode)
	require.Equal(t, "r1-prefill", p.Name)
	require.Equal(t, "r1", p.Engine.ServedModelName)
	require.Equal(t, "r1", dc.Engine.ServedModelName)
	require.Equal(t, RolePrefill, p.Engine.KVTransfer.Role)
	require.Equal(t, RoleDecode, dc.Engine.KVTransfer.Role)
	require.Equal(t, "fail", dc.Engine.KVTransfer.FailurePolicy, "defaults per role")
	require.Equal(t, 1, p.Engine.TensorParallelSize, "DP8 on 8 GPUs: TP1 per rank")
	require.Equal(t, 8, p.Engine.DataParallel.Size)
	require.Equal(t, 16, dc.Engine.DataParallel.Size)
	require.Equal(t, 1, dc.Engine.TensorParallelSize, "DP16 over 2 × 8 GPUs: TP1 per rank")
	require.Equal(t, 2, dc.Resources.Nodes)
	require.Equal(t, Replicas{Min: 1, Max: 4}, p.Replicas)
	require.NotNil(t, p.Autoscaling)
	require.Equal(t, 2, dc.DesiredReplicas())
	require.Equal(t, "b", dc.Engine.Env["A"])
	require.Empty(t, d.Engine.Env, "the deployment's own env is untouched")
	require.Equal(t, []string{"--max-model-len", "32768"}, dc.Engine.Args)
	require.Nil(t, p.Roles)
	require.NoError(t, p.Validate())
	require.NoError(t, dc.Validate())
}

func TestRolesRefusals(t *testing.T) {
	for _, tc := range []struct{ change, old, want string }{
		{"engine: {kind: vllm, tensorParallelSize: 8, args: [--max-model-len, '32768']}", "engine: {kind: vllm, tensorParallelSize: 8, kvTransfer: {connector: nixl}, args: [--max-model-len, '32768']}", "engine.kvTransfer: is required with roles"},
		{"kvTransfer: {connector: nixl, role: prefill}", "kvTransfer: {connector: nixl}", "engine.kvTransfer.role: is set by each role"},
		{"resources: {nodes: 1, gpusPerNode: 8}\nreplicas: {count: 2}", "resources: {nodes: 1, gpusPerNode: 8}", "replicas: a deployment with roles sets replicas and autoscaling per role"},
		{"ratio: {min: 3, max: 2}", "ratio: {min: 0.5, max: 2}", "roles.ratio: needs 0 ≤ min ≤ max"},
		{"resources: {nodes: 2, gpusPerNode: 4}", "resources: {nodes: 2, gpusPerNode: 8}", "roles.decode: engine.dataParallel.size"},
		{"engine: {tensorParallelSize: 4, args: [--max-model-len, '16384']}\n    resources: {nodes: 1, gpusPerNode: 4}\n    replicas: {count: 2}", "engine: {dataParallel: {size: 16, loadBalancing: hybrid}, expertParallel: {enabled: true}, env: {A: b}}\n    resources: {nodes: 2, gpusPerNode: 8}\n    replicas: {count: 2}",
			"roles: deployments r1-prefill (prefill) and r1-decode (decode) of model r1 cannot be paired"},
		{"name: a-name-that-is-long-enough-to-fail", "name: r1", "too long for a deployment with roles"},
	} {
		doc := replaceOnce(t, rolesDoc, tc.old, tc.change)
		_, err := Parse([]byte(doc))
		require.ErrorIs(t, err, ErrInvalid, tc.want)
		require.ErrorContains(t, err, tc.want)
	}
}

func replaceOnce(t *testing.T, s, old, new string) string {
	t.Helper()
	require.Contains(t, s, old)
	return strings.Replace(s, old, new, 1)
}

func TestRoleDesired(t *testing.T) {
	r := &RoleRatio{Min: 0.5, Max: 2}
	for _, c := range []struct{ p, d, want int }{
		{1, 4, 2}, // at least half a prefill per decode replica
		{9, 4, 8}, // at most two
		{3, 4, 3}, // within: the autoscaler's
		{0, 1, 1}, // a decode replica gets at least one prefill
		{5, 0, 5}, // no decode replica: the prefill autoscaler's own
		{1, 3, 2}, // ceil(1.5)
	} {
		require.Equal(t, c.want, RoleDesired(c.p, c.d, r), "%+v", c)
	}
	require.Equal(t, 3, RoleDesired(1, 30, &RoleRatio{Min: 0.1}), "0.1 × 30 in floating point is a hair over 3: still 3")
	require.Equal(t, 7, RoleDesired(7, 2, nil))
	require.Equal(t, 1, RoleDesired(3, 2, &RoleRatio{Max: 0.5}), "floor(0.5 × 2) = 1")
}

// The shipped example parses, and its roles are what it says.
func TestPDExample(t *testing.T) {
	b, err := os.ReadFile("../deploy/deepseek-r1-pd.yaml")
	require.NoError(t, err)
	d, err := Parse(b)
	require.NoError(t, err)
	p, dc := d.RoleDeployment(RolePrefill), d.RoleDeployment(RoleDecode)
	require.Equal(t, 8, p.Engine.DataParallel.Size)
	require.Equal(t, 16, dc.Engine.DataParallel.Size)
	require.Equal(t, LBHybrid, dc.Engine.DataParallel.LoadBalancing)
	require.Equal(t, 2, dc.Resources.Nodes)
	require.Equal(t, "recompute", dc.Engine.KVTransfer.FailurePolicy)
	require.Equal(t, "kv_cache_usage_perc", dc.Autoscaling.Metric)
	require.Equal(t, "deepep_low_latency", dc.Engine.ExpertParallel.All2AllBackend)
	require.Equal(t, "deepep_high_throughput", p.Engine.ExpertParallel.All2AllBackend)
}
