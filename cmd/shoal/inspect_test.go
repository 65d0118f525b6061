package main

import (
	"testing"

	"github.com/shoalhq/shoal/agent"
	"github.com/shoalhq/shoal/gpu"
	"github.com/stretchr/testify/require"
)

// TestVerdictWithoutGPUs: a host with no GPUs is not "ready" (it said so).
func TestVerdictWithoutGPUs(t *testing.T) {
	problems := verdict(&agent.HostInventory{})
	require.Len(t, problems, 1)
	require.Contains(t, problems[0], "no GPUs: this host cannot serve GPU engines")
	require.Empty(t, verdict(&agent.HostInventory{GPU: &gpu.Inventory{Devices: []gpu.Device{{Index: 0}}}}))
}
