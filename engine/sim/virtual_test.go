package sim

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestVirtualCountsPreemptions: two requests whose prompts fit the KV cache
// together but whose outputs do not make the scheduler preempt the newer one
// (vLLM's recompute), and Preemptions says so; with room for both, none.
func TestVirtualCountsPreemptions(t *testing.T) {
	for _, tc := range []struct {
		blocks  int
		preempt bool
	}{{blocks: 24, preempt: true}, {blocks: 400, preempt: false}} {
		p := DefaultParams()
		p.NumGPUBlocks, p.BlockSize = tc.blocks, 16
		v := NewVirtual(p, "7")
		// 10 blocks of prompt each; 64 output tokens need 4 more blocks each.
		for _, tag := range []string{"a", "b"} {
			v.Submit(v.Now(), strings.Repeat(tag, 4*16*10), 64)
		}
		for v.Busy() {
			v.Step()
		}
		if tc.preempt {
			require.Positive(t, v.Preemptions(), "%d blocks", tc.blocks)
		} else {
			require.Zero(t, v.Preemptions(), "%d blocks", tc.blocks)
		}
	}
}
