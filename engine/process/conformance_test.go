package process

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/enginetest"
	"github.com/shoalhq/shoal/internal/ocitest"
)

func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the simulator")
	}
	dir := t.TempDir()
	sim, err := ocitest.BuildSim(dir)
	require.NoError(t, err)
	vllm := filepath.Join(dir, "vllm")
	require.NoError(t, os.Symlink(sim, vllm))
	logs := filepath.Join(dir, "logs")
	enginetest.Run(t, enginetest.Setup{
		Runtime: New(logs),
		Reopen:  func(*testing.T) engine.Runtime { return New(logs) },
		VLLM:    vllm,
	})
}
