package spec

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

const dpDoc = "apiVersion: shoal/v1\nname: r1\nmodel: {source: /m}\nresources: {nodes: 2, gpusPerNode: 8}\nengine: {kind: %s, %s}\n"

func TestDataParallelDefaults(t *testing.T) {
	d, err := Parse([]byte(fmt.Sprintf(dpDoc, "vllm", "dataParallel: {size: 16}, expertParallel: {enabled: true}")))
	require.NoError(t, err)
	dp := d.Engine.DataParallel
	require.Equal(t, 8, dp.SizePerNode, "size / nodes")
	require.Equal(t, 1, d.Engine.TensorParallelSize, "GPUs / size")
	require.Equal(t, 1, d.Engine.PipelineParallelSize)
	require.Equal(t, LBInternal, dp.LoadBalancing)
	require.Equal(t, DefaultDPRPCPort, dp.RPCPort)
	require.Equal(t, 29550, dp.DPRPCPort(1, 1))
	require.Equal(t, 29551, dp.DPRPCPort(2, 1), "a re-formed group")
	require.Equal(t, 29552, dp.DPRPCPort(2, 2), "a restarted one")
	require.Equal(t, 29550, dp.DPRPCPort(DPPortWindow+1, 1), "the window wraps")
	require.True(t, d.Engine.EPOn())
	on, why := KVEventsActive(d)
	require.False(t, on)
	require.Contains(t, why, "engine.dataParallel")

	d, err = Parse([]byte(fmt.Sprintf(dpDoc, "vllm", "tensorParallelSize: 2, dataParallel: {size: 8, loadBalancing: external}")))
	require.NoError(t, err)
	require.Equal(t, 4, d.Engine.DataParallel.SizePerNode)
	require.Equal(t, 4, d.Engine.DataParallel.APIPorts(), "external: a port per local rank")
}

// Bad combinations name the field and show the arithmetic.
func TestDataParallelErrors(t *testing.T) {
	for _, tc := range []struct {
		kind, engine string
		field, text  string
	}{
		{"vllm", "tensorParallelSize: 2, dataParallel: {size: 16}", "engine.dataParallel.size", "(16 × 2 = 32) must equal resources.nodes × resources.gpusPerNode (2 × 8 = 16)"},
		{"vllm", "tensorParallelSize: 1, dataParallel: {size: 16, sizePerNode: 3}", "engine.dataParallel.sizePerNode", "3 does not divide dataParallel.size (16)"},
		{"vllm", "tensorParallelSize: 1, dataParallel: {size: 16, sizePerNode: 4}", "engine.dataParallel.sizePerNode", "(16 / 4 = 4 nodes) must equal resources.nodes (2)"},
		{"vllm", "dataParallel: {size: 0}", "engine.dataParallel.size", "at least 1"},
		{"vllm", "dataParallel: {size: 16, loadBalancing: roundrobin}", "engine.dataParallel.loadBalancing", `unknown mode "roundrobin"`},
		{"sglang", "dataParallel: {size: 16, loadBalancing: hybrid}", "engine.dataParallel.loadBalancing", "use internal"},
		{"ray-vllm", "dataParallel: {size: 16}", "engine.dataParallel", "needs engine.kind vllm or sglang, got ray-vllm"},
		{"command", "command: [x], expertParallel: {enabled: true}", "engine.expertParallel", "MoE-capable"},
		{"vllm", "dataParallel: {size: 16}, pipelineParallelSize: 2", "engine.pipelineParallelSize", "must be 1 with engine.dataParallel"},
		{"vllm", "port: 8000, dataParallel: {size: 16, loadBalancing: external, rpcPort: 8004}", "engine.dataParallel.rpcPort", "ports 8004-8019 (one per epoch) clash with the API servers' 8000-8007"},
		{"vllm", "dataParallel: {size: 16, rpcPort: 29495}", "engine.dataParallel.rpcPort", "include engine.masterPort (29500)"},
		{"vllm", "dataParallel: {size: 16, rpcPort: 65530}", "engine.dataParallel.rpcPort", "1-65520"},
		{"vllm", "port: 65530, dataParallel: {size: 16, loadBalancing: external}", "engine.port", "65530-65537"},
		{"vllm", "dataParallel: {size: 16, loadBalancing: external, apiServers: 2}", "engine.dataParallel.apiServers", "external runs one API server per rank"},
		{"sglang", "dataParallel: {size: 16, apiServers: 2}", "engine.dataParallel.apiServers", "SGLang has one HTTP server"},
		{"vllm", "expertParallel: {enabled: true, all2allBackend: nccl}", "engine.expertParallel.all2allBackend", `unknown backend "nccl" for vllm`},
		{"sglang", "expertParallel: {enabled: true, all2allBackend: pplx}", "engine.expertParallel.all2allBackend", "one of none, deepep, mooncake"},
		{"vllm", "expertParallel: {enabled: false, eplb: {redundantExperts: 32}}", "engine.expertParallel.enabled", "set enabled: true"},
		{"vllm", "expertParallel: {enabled: true, eplb: {windowSize: -1}}", "engine.expertParallel.eplb.windowSize", "must be 0 to"},
		{"vllm", "dataParallel: {size: 16}, args: [--data-parallel-size=4]", "engine.args[0]", "set by shoal from engine.dataParallel"},
		{"sglang", "dataParallel: {size: 16}, args: [--enable-dp-attention]", "engine.args[0]", "set by shoal"},
	} {
		t.Run(tc.field+" "+tc.engine, func(t *testing.T) {
			_, err := Parse([]byte(fmt.Sprintf(dpDoc, tc.kind, tc.engine)))
			require.ErrorIs(t, err, ErrInvalid)
			var fe *Error
			found := false
			for _, e := range unwrapAll(err) {
				if errors.As(e, &fe) && fe.Field == tc.field {
					require.Contains(t, fe.Msg, tc.text)
					found = true
				}
			}
			require.True(t, found, "no error for %s in %v", tc.field, err)
		})
	}
}

// unwrapAll flattens joined errors.
func unwrapAll(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, unwrapAll(e)...)
		}
		return out
	}
	if u := errors.Unwrap(err); u != nil {
		return append([]error{err}, unwrapAll(u)...)
	}
	return []error{err}
}

func TestWideEPExample(t *testing.T) {
	b, err := os.ReadFile("../deploy/deepseek-r1-wide-ep.yaml")
	require.NoError(t, err)
	d, err := Parse(b)
	require.NoError(t, err)
	require.Equal(t, 16, d.Engine.DataParallel.Size)
	require.Equal(t, 1, d.Engine.TensorParallelSize)
	require.True(t, d.Engine.EPOn())
}

// A spec without the new fields keeps its JSON (and so its rollout hash).
func TestParallelFieldsOmitted(t *testing.T) {
	d, err := Parse([]byte(base))
	require.NoError(t, err)
	require.NotContains(t, string(d.JSON()), "dataParallel")
	require.NotContains(t, string(d.JSON()), "expertParallel")
}

func FuzzParseParallel(f *testing.F) {
	for _, e := range []string{"dataParallel: {size: 16}", "dataParallel: {size: 16, loadBalancing: hybrid, apiServers: 2}",
		"dataParallel: {size: 4, sizePerNode: 2, loadBalancing: external, rpcPort: 13345}, tensorParallelSize: 4",
		"expertParallel: {enabled: true, all2allBackend: deepep_low_latency, eplb: {windowSize: 1000, stepInterval: 3000, redundantExperts: 32}}"} {
		f.Add([]byte(fmt.Sprintf(dpDoc, "vllm", e)))
		f.Add([]byte(fmt.Sprintf(dpDoc, "sglang", e)))
	}
	f.Add([]byte(fmt.Sprintf(dpDoc, "vllm", "kvTransfer: {connector: nixl, role: prefill, leaseSeconds: 60}")))
	f.Add([]byte(fmt.Sprintf(dpDoc, "vllm", "dataParallel: {size: 16}, kvTransfer: {connector: nixl, role: decode, sideChannelPort: 20000}")))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := Parse(b)
		if err != nil {
			return
		}
		if dp := d.Engine.DataParallel; dp != nil {
			// What validates must be launchable: every rank has its GPUs.
			if dp.Size*d.Engine.TensorParallelSize != d.Resources.Nodes*d.Resources.GPUsPerNode || dp.SizePerNode*d.Resources.Nodes != dp.Size {
				t.Fatalf("accepted an impossible layout: %+v tp %d resources %+v", dp, d.Engine.TensorParallelSize, d.Resources)
			}
		}
		if _, err := FromJSON(d.JSON()); err != nil {
			t.Fatalf("accepted spec fails after JSON round trip: %v", err)
		}
	})
}
