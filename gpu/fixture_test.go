package gpu

import (
	"encoding/json"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestRealH200Fixtures reads what `shoal agent inspect -o json` printed on the
// device machines (1 and 2 H200s, driver 580.159.04, captured 2026-11-28):
// the format stays readable and the real-hardware facts hold.
func TestRealH200Fixtures(t *testing.T) {
	for file, n := range map[string]int{"testdata/h200-1gpu-inspect.json": 1, "testdata/h200-2gpu-inspect.json": 2} {
		b, err := os.ReadFile(file)
		require.NoError(t, err)
		var got struct {
			GPU   Inventory `json:"gpu"`
			Ready bool      `json:"ready"`
		}
		require.NoError(t, json.Unmarshal(b, &got), file)
		require.True(t, got.Ready, file)
		require.Len(t, got.GPU.Devices, n, file)
		require.Equal(t, "H200", got.GPU.Model())
		require.Equal(t, "13.0", got.GPU.CUDAVersion)
		for _, d := range got.GPU.Devices {
			require.Equal(t, "9.0", d.ComputeCapability)
			require.Greater(t, d.MemoryMiB, uint64(140_000))
			require.True(t, d.ECCEnabled)
			require.True(t, d.Healthy)
			// On real H200s NUMA and page retirement are unsupported (row
			// remapping replaced retirement): recorded, not errors.
			require.Contains(t, d.Unsupported, "retired_pages_pending")
			if n == 2 {
				require.Len(t, d.NVLinks, 18, "NVLinks between the two GPUs")
			}
		}
	}
}
