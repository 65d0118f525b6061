package engine

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRotateLogCopiesTruncatesAndKeepsN(t *testing.T) {
	p := t.TempDir() + "/vllm.log"
	// A writer holding the file open with O_APPEND, as an engine does.
	w, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	require.NoError(t, err)
	defer w.Close()
	for round := 1; round <= 4; round++ {
		_, err := w.WriteString(strings.Repeat(string(rune('a'+round)), 100) + "\n")
		require.NoError(t, err)
		rotated, err := RotateLog(p, 50, 2)
		require.NoError(t, err)
		require.True(t, rotated)
		st, err := os.Stat(p)
		require.NoError(t, err)
		require.Zero(t, st.Size())
	}
	// The writer's next line lands at the start of the truncated file.
	_, err = w.WriteString("after\n")
	require.NoError(t, err)
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	require.Equal(t, "after\n", string(b))
	one, err := os.ReadFile(p + ".1")
	require.NoError(t, err)
	require.Equal(t, strings.Repeat("e", 100)+"\n", string(one), ".1 is the newest")
	two, err := os.ReadFile(p + ".2")
	require.NoError(t, err)
	require.Equal(t, strings.Repeat("d", 100)+"\n", string(two))
	_, err = os.Stat(p + ".3")
	require.True(t, os.IsNotExist(err), "only keep=2 old files")

	rotated, err := RotateLog(p, 50, 2)
	require.NoError(t, err)
	require.False(t, rotated, "small files stay")
	rotated, err = RotateLog(t.TempDir()+"/missing.log", 1, 2)
	require.NoError(t, err)
	require.False(t, rotated)
}

func TestProcessEnvIsExact(t *testing.T) {
	t.Setenv("HF_TOKEN", "secret")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("PATH", "/opt/bin:/usr/bin")
	t.Setenv("HOME", "/root")
	env := ProcessEnv(Command{Env: []string{"VLLM_HOST_IP=10.0.0.1", "HOME=/home/engine"}})
	require.Contains(t, env, "PATH=/opt/bin:/usr/bin")
	require.Contains(t, env, "VLLM_HOST_IP=10.0.0.1")
	require.Contains(t, env, "HOME=/home/engine", "the plan wins")
	for _, kv := range env {
		require.NotContains(t, kv, "secret", "credentials are not inherited")
	}
}
