package router

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestAPIKeysFile(t *testing.T) {
	key, e, err := NewKey("team-a", []string{"m"}, 5, 0)
	require.NoError(t, err)
	dir := t.TempDir()
	p := filepath.Join(dir, "keys.yaml")
	require.NoError(t, os.WriteFile(p, []byte("keys:\n"+indent(MarshalEntry(e))), 0o600))
	ks, err := LoadAPIKeys(p)
	require.NoError(t, err)
	k := ks.lookup(key)
	require.NotNil(t, k)
	require.Equal(t, 10, k.Burst, "burst defaults to 2×rps")
	require.Equal(t, []string{"m"}, k.models())
	require.Nil(t, ks.lookup("sk-shoal-wrong"))
	for i := 0; i < 10; i++ {
		ok, _ := k.take()
		require.True(t, ok, "within the burst")
	}
	ok, wait := k.take()
	require.False(t, ok)
	require.Greater(t, wait.Seconds(), 0.0)

	for body, want := range map[string]string{
		"sk-demo: [m]\n": "want `keys:",
		"keys:\n  - {name: a, sha256: abc, models: [m]}\n":                                                                    "64 hex",
		"keys:\n  - {name: a, sha256: " + e.SHA256 + "}\n":                                                                    "list the models",
		"keys:\n  - {sha256: " + e.SHA256 + ", models: [m]}\n":                                                                "name is required",
		"keys:\n  - {name: a, sha256: " + e.SHA256 + ", models: [m], rps: -1}\n":                                              "negative",
		"keys:\n  - {name: a, sha256: " + e.SHA256 + ", models: [m]}\n  - {name: b, sha256: " + e.SHA256 + ", models: [m]}\n": "twice",
	} {
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		_, err := LoadAPIKeys(p)
		require.ErrorContains(t, err, want, body)
	}
	_, _, err = NewKey("a b", []string{"m"}, 0, 0)
	require.Error(t, err)
	_, _, err = NewKey("a", nil, 0, 0)
	require.Error(t, err)
}

func indent(s string) string {
	out := ""
	for _, l := range splitLines(s) {
		out += "  " + l + "\n"
	}
	return out
}

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := range s {
		if s[i] == '\n' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}
