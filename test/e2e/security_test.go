package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/gossip"
	"github.com/stretchr/testify/require"
)

// TestKeyringRotationThroughTheCLI rotates the gossip key of a running
// cluster (coordinator and agents) with `shoal keyring`, as an operator
// would: install, use, remove. Every node's key file ends with only the new
// key, and the cluster keeps serving throughout.
func TestKeyringRotationThroughTheCLI(t *testing.T) {
	e := startCluster(t, 20, 2)
	e.apply("one.yaml", strings.Replace(spec2x2, "count: 2", "count: 1", 1))
	_ = e.oneReplica()

	out, err := exec.Command(filepath.Join(binDir, "shoal"), "keyring", "generate").Output()
	require.NoError(t, err)
	newKey := strings.TrimSpace(string(out))
	k, err := gossip.ParseKey(newKey)
	require.NoError(t, err)
	fp := gossip.Fingerprint(k)
	oldFile := filepath.Join(e.c.TLSDir("ca"), "gossip.key")
	old, err := gossip.LoadKeyFile(oldFile)
	require.NoError(t, err)
	oldFP := gossip.Fingerprint(old[0])

	out2, err := e.shoal("keyring", "list")
	require.NoError(t, err, out2)
	require.Equal(t, 3, strings.Count(out2, oldFP), "coordinator and two agents share the key:\n%s", out2)

	for _, step := range []string{"install", "use"} {
		out, err := e.shoal("keyring", step, newKey)
		require.NoError(t, err, out)
		require.Contains(t, out, step+" done on 3 node(s)")
	}
	out2, err = e.shoal("keyring", "remove", oldFP) // a fingerprint is not a key
	require.Error(t, err)
	require.Contains(t, out2, "AES needs 16, 24 or 32")
	out2, err = e.shoal("keyring", "remove", newKey)
	require.Error(t, err, "the primary key cannot be removed")
	require.Contains(t, out2, "primary")
	oldB64 := strings.TrimSpace(strings.Split(mustRead(t, oldFile), "\n")[0])
	out2, err = e.shoal("keyring", "remove", oldB64)
	require.NoError(t, err, out2)
	require.Contains(t, out2, "remove done on 3 node(s)")

	for _, name := range []string{"coordinator", "node-1", "node-2"} {
		keys, err := gossip.LoadKeyFile(filepath.Join(e.c.TLSDir(name), "gossip.key"))
		require.NoError(t, err)
		require.Len(t, keys, 1, name)
		require.Equal(t, fp, gossip.Fingerprint(keys[0]), "%s saved the new key for its next start", name)
	}
	require.Equal(t, 1, readyCount(e.replicas()), "serving went on")
}

func mustRead(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return string(b)
}
