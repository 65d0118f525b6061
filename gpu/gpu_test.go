package gpu

import (
	"context"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/stretchr/testify/require"
)

func TestMockH200(t *testing.T) {
	ins, err := New("mock:h200x8")
	require.NoError(t, err)
	inv, err := ins.Inspect(context.Background())
	require.NoError(t, err)
	require.Len(t, inv.Devices, 8)
	require.Equal(t, "H200", inv.Model())
	require.True(t, inv.Healthy())
	require.NotEmpty(t, inv.DriverVersion)
	require.Greater(t, inv.Devices[0].MemoryMiB, uint64(130_000))
	require.NotEqual(t, inv.Devices[0].UUID, inv.Devices[1].UUID)

	ins, err = New("mock:h200x2")
	require.NoError(t, err)
	inv, err = ins.Inspect(context.Background())
	require.NoError(t, err)
	require.Len(t, inv.Devices, 2)
}

func TestBackendErrors(t *testing.T) {
	for _, b := range []string{"mock:h200x0", "mock:h200x9", "mock:h200xfoo", "cuda"} {
		_, err := New(b)
		require.Error(t, err, b)
	}
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
