package gpu

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/shoalhq/shoal/gpu/gputest"
	"github.com/stretchr/testify/require"
)

func TestFullInventory(t *testing.T) {
	inv, err := NewNVML(gputest.NewH200(8)).Inspect(context.Background())
	require.NoError(t, err)
	require.Len(t, inv.Devices, 8)
	require.Equal(t, "H200", inv.Model())
	require.Equal(t, "550.54.15", inv.DriverVersion)
	require.Equal(t, "12.4", inv.CUDAVersion)
	require.True(t, inv.Healthy())
	d := inv.Devices[5]
	require.Equal(t, 5, d.Index)
	require.Equal(t, "9.0", d.ComputeCapability)
	require.NotEmpty(t, d.PCIBusID)
	require.Equal(t, 1, d.NUMANode)
	require.Len(t, d.NVLinks, 18)
	require.True(t, d.ECCEnabled)
	require.Greater(t, d.MemoryMiB, uint64(130_000))
	require.Equal(t, 34, d.TemperatureC)
	require.InDelta(t, 98.0, d.PowerW, 0.01)
	require.Empty(t, d.Unsupported)
	require.NotEqual(t, inv.Devices[0].UUID, inv.Devices[1].UUID)
}

func TestUnsupportedAndLost(t *testing.T) {
	f := gputest.NewH200(2)
	f.Device(0).GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	f.Device(0).GetNumaNodeIdFunc = nil // a binding without the call: the mock panics
	f.Device(1).GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 0, nvml.ERROR_GPU_IS_LOST }
	inv, err := NewNVML(f).Inspect(context.Background())
	require.NoError(t, err)
	d0, d1 := inv.Devices[0], inv.Devices[1]
	require.ElementsMatch(t, []string{"power", "numa_node"}, d0.Unsupported)
	require.Equal(t, -1, d0.NUMANode)
	require.True(t, d0.Healthy, "unsupported is not unhealthy")
	require.False(t, d1.Healthy)
	require.Contains(t, d1.Reasons[0], "GPU is lost")
}

func TestPeriodicHealthRules(t *testing.T) {
	cases := map[string]struct {
		mod    func(f *gputest.Fake)
		reason string
	}{
		"remap failure": {func(f *gputest.Fake) {
			f.Device(0).GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 0, 3, false, true, nvml.SUCCESS }
		}, "row remapping failed"},
		"remap pending": {func(f *gputest.Fake) {
			f.Device(0).GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 1, 0, true, false, nvml.SUCCESS }
		}, "row remapping pending"},
		"retired pages pending": {func(f *gputest.Fake) {
			f.Device(0).GetRetiredPagesPendingStatusFunc = func() (nvml.EnableState, nvml.Return) { return nvml.FEATURE_ENABLED, nvml.SUCCESS }
		}, "page retirement pending"},
		"nvlink down": {func(f *gputest.Fake) {
			f.Device(0).GetNvLinkStateFunc = func(l int) (nvml.EnableState, nvml.Return) {
				if l >= 18 {
					return 0, nvml.ERROR_INVALID_ARGUMENT
				}
				if l == 7 {
					return nvml.FEATURE_DISABLED, nvml.SUCCESS
				}
				return nvml.FEATURE_ENABLED, nvml.SUCCESS
			}
		}, "NVLink 7 is down"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			f := gputest.NewH200(2)
			c.mod(f)
			inv, err := NewNVML(f).Inspect(context.Background())
			require.NoError(t, err)
			require.False(t, inv.Healthy())
			require.Contains(t, inv.Devices[0].Reasons[0], c.reason)
			require.True(t, inv.Devices[1].Healthy)
		})
	}
}

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		typ, data uint64
		critical  bool
	}{
		{nvml.EventTypeXidCriticalError, 79, true},  // fell off the bus
		{nvml.EventTypeXidCriticalError, 48, true},  // double-bit ECC
		{nvml.EventTypeXidCriticalError, 13, false}, // application
		{nvml.EventTypeXidCriticalError, 31, false},
		{nvml.EventTypeXidCriticalError, 43, false},
		{nvml.EventTypeXidCriticalError, 45, false},
		{nvml.EventTypeXidCriticalError, 68, false},
		{nvml.EventTypeXidCriticalError, 109, false},
		{nvml.EventTypeDoubleBitEccError, 0, true},
	} {
		ev := Classify(c.typ, c.data)
		require.Equal(t, c.critical, ev.Critical, "type %d data %d", c.typ, c.data)
		require.NotEmpty(t, ev.Reason)
	}
}

func TestWatchInjectedEvents(t *testing.T) {
	f := gputest.NewH200(4)
	faults := filepath.Join(t.TempDir(), "faults")
	f.FaultsFile(faults)
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan Event, 4)
	done := make(chan error, 1)
	go func() { done <- NewNVML(f).Watch(ctx, out) }()
	f.InjectXID(2, 79)
	ev := <-out
	require.Equal(t, 2, ev.Index)
	require.Equal(t, uint64(79), ev.XID)
	require.True(t, ev.Critical)
	require.NotEmpty(t, ev.UUID)
	require.NoError(t, os.WriteFile(faults, []byte("xid 3 13\necc 1\ngarbage\nxid 99 79\n"), 0o644))
	got := map[int]Event{}
	for len(got) < 2 {
		select {
		case ev := <-out:
			got[ev.Index] = ev
		case <-time.After(3 * time.Second):
			t.Fatalf("file faults not delivered: %v", got)
		}
	}
	require.False(t, got[3].Critical, "XID 13 is an application error")
	require.True(t, got[1].Critical)
	cancel()
	require.NoError(t, <-done)
}

func TestBackendErrors(t *testing.T) {
	for _, b := range []string{"mock:h200x0", "mock:h200x9", "mock:h200xfoo", "cuda"} {
		_, err := New(b)
		require.Error(t, err, b)
	}
	ins, err := New("mock:h200x2")
	require.NoError(t, err)
	inv, err := ins.Inspect(context.Background())
	require.NoError(t, err)
	require.Len(t, inv.Devices, 2)
}

func TestNoDriverIsZeroGPUs(t *testing.T) {
	lib := &mock.Interface{InitFunc: func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND }}
	_, err := NewNVML(lib).Inspect(context.Background())
	require.ErrorIs(t, err, ErrNoDriver)
	inv, err := (&fallback{primary: NewNVML(lib)}).Inspect(context.Background())
	require.NoError(t, err)
	require.Empty(t, inv.Devices)
	require.Equal(t, "", inv.Model())
}

func TestShortModel(t *testing.T) {
	require.Equal(t, "H200", ShortModel("NVIDIA H200"))
	require.Equal(t, "H100", ShortModel("NVIDIA H100 80GB HBM3"))
	require.Equal(t, "A100-SXM4-80GB", ShortModel("NVIDIA A100-SXM4-80GB"))
}
