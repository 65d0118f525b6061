package engine

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

// TestLoRAGolden: the command lines of engines with LoRA slots
// (engine/testdata/lora/*.golden): vLLM's flags on every node's engine, and
// VLLM_ALLOW_RUNTIME_LORA_UPDATING on the API server's.
func TestLoRAGolden(t *testing.T) {
	ips := []string{"10.0.0.1", "10.0.0.2"}
	bin := Binaries{VLLM: "/usr/bin/vllm", Ray: "/usr/bin/ray", Python: "/usr/bin/python3"}
	for _, kind := range []string{spec.EngineVLLM, spec.EngineRayVLLM} {
		d, err := spec.Parse([]byte(fmt.Sprintf(`apiVersion: shoal/v1
name: llama
model: {source: /models/llama}
engine: {kind: %s, lora: {maxLoras: 8, maxLoraRank: 64}}
resources: {nodes: 2, gpusPerNode: 8}
adapters:
  - {name: sql, source: "s3://loras/sql", rank: 16}
`, kind)))
		require.NoError(t, err)
		for rank, ip := range ips {
			role := RoleHead
			if rank > 0 {
				role = RoleWorker
			}
			t.Run(fmt.Sprintf("%s-rank%d", kind, rank), func(t *testing.T) {
				in := PlanInput{Spec: d, Role: role, NodeIP: ip, HeadIP: ips[0], Epoch: 1, Term: 1, MemberIPs: ips, Bin: bin}
				var p *Plan
				if kind == spec.EngineRayVLLM {
					p, err = RayVLLM(in)
				} else {
					p, err = NativePlan(in, rank)
				}
				require.NoError(t, err)
				got := renderPlan(p)
				if p.Serve != nil {
					got += fmt.Sprintf("serve: %s\n  %s\n", strings.Join(p.Serve.Env, " "), strings.Join(p.Serve.Argv(), " "))
				}
				path := filepath.Join("testdata", "lora", fmt.Sprintf("%s-rank%d.golden", kind, rank))
				if *update {
					require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
					require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
				}
				want, err := os.ReadFile(path)
				require.NoError(t, err, "run with -update to write it")
				require.Equal(t, string(want), got)
				if kind == spec.EngineVLLM || rank == 0 {
					require.Contains(t, got, "--enable-lora --max-loras 8 --max-lora-rank 64 --max-cpu-loras 16")
				}
				if rank == 0 {
					require.Contains(t, got, "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
				}
			})
		}
	}
}
