package gpu

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/require"
)

// TestRealNVML runs the real NVML path on a host with an NVIDIA driver (the
// H200 device machine) and skips, saying so, everywhere else (CI has no GPU).
func TestRealNVML(t *testing.T) {
	lib := nvml.New()
	if ret := lib.Init(); ret != nvml.SUCCESS {
		t.Skipf("no NVIDIA driver here (%v): the real-hardware path runs on the GPU machine only", ret)
	}
	lib.Shutdown()
	n := NewNVML(lib)
	inv, err := n.Inspect(context.Background())
	require.NoError(t, err)
	require.NotEmpty(t, inv.Devices)
	require.NotEmpty(t, inv.DriverVersion)
	require.NotEmpty(t, inv.CUDAVersion)
	for _, d := range inv.Devices {
		t.Logf("GPU %d (/dev/nvidia%d) %s %s %d MiB cc %s pci %s numa %d nvlinks %d ecc %v healthy %v unsupported %v",
			d.Index, d.Minor, d.UUID, d.Name, d.MemoryMiB, d.ComputeCapability, d.PCIBusID, d.NUMANode, len(d.NVLinks), d.ECCEnabled, d.Healthy, d.Unsupported)
		require.GreaterOrEqual(t, d.Minor, 0, "the device number Slurm's GPU ids name")
		require.True(t, strings.HasPrefix(d.UUID, "GPU-"), d.UUID)
		require.NotEmpty(t, d.Name)
		require.NotZero(t, d.MemoryMiB)
		require.NotEmpty(t, d.PCIBusID)
	}
	// A real Xid watch starts, registers on every GPU and stops on cancel.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Watch(ctx, make(chan Event, 8)) }()
	require.Eventually(t, func() bool { return n.Registered() == len(inv.Devices) }, 10*time.Second, 20*time.Millisecond)
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("watch did not stop")
	}
}
