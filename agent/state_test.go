package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestStateRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := LoadState(dir)
	require.NoError(t, err)
	require.Nil(t, s.Assignment)
	s = State{NodeID: "n1", LastTerm: 4, Assignment: &Assignment{Group: "g", Epoch: 2, Members: []Member{{NodeID: "n1"}}}}
	require.NoError(t, s.Save(dir))
	got, err := LoadState(dir)
	require.NoError(t, err)
	require.Equal(t, s, got)
	entries, _ := os.ReadDir(dir)
	require.Len(t, entries, 1, "no temp files left behind")
}

func TestStateCorrupt(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, stateFile), []byte("{nope"), 0o600))
	_, err := LoadState(dir)
	require.ErrorContains(t, err, "move it aside")
}

func TestConfigValidate(t *testing.T) {
	c := Config{Address: "0.0.0.0"}
	c.Defaults()
	c.NodeID = "n1"
	err := c.Validate()
	require.ErrorContains(t, err, "address")
	c.Address = "10.0.0.1"
	require.NoError(t, c.Validate())
	c.ReplicaPort = c.GRPCPort
	require.ErrorContains(t, c.Validate(), "replica_port")
}
