package process

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/stretchr/testify/require"
)

func TestStartLogsAndExit(t *testing.T) {
	r := New(t.TempDir())
	h, err := r.Start(context.Background(), engine.Command{Name: "echo", Path: "/bin/sh",
		Args: []string{"-c", "echo hello $FOO; exit 3"}, Env: []string{"FOO=bar"}})
	require.NoError(t, err)
	select {
	case <-h.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("no exit")
	}
	require.Error(t, h.Err())
	b, err := os.ReadFile(h.LogPath())
	require.NoError(t, err)
	require.Contains(t, string(b), "hello bar")
	require.Contains(t, string(b), "shoal: starting FOO=bar echo -c")
}

func TestStopKillsWholeGroup(t *testing.T) {
	r := New(t.TempDir())
	// The shell ignores SIGTERM and has a child: both must be gone after Stop.
	h, err := r.Start(context.Background(), engine.Command{Name: "stubborn", Path: "/bin/sh",
		Args: []string{"-c", "trap '' TERM; sleep 300 & echo $! > " + t.TempDir() + "/x; wait"}})
	require.NoError(t, err)
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	require.NoError(t, h.Stop(context.Background(), 300*time.Millisecond))
	require.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond)
	// No process of the group is left.
	require.Eventually(t, func() bool { return syscall.Kill(-h.Pid(), 0) != nil }, 3*time.Second, 50*time.Millisecond)
	require.NoError(t, h.Stop(context.Background(), time.Second)) // idempotent
}

func TestStartMissingBinary(t *testing.T) {
	_, err := New(t.TempDir()).Start(context.Background(), engine.Command{Name: "vllm", Path: "/nonexistent/vllm"})
	require.Error(t, err)
	require.True(t, strings.Contains(err.Error(), "/nonexistent/vllm"))
}

func TestStartTicks(t *testing.T) {
	st, err := StartTicks(os.Getpid())
	require.NoError(t, err)
	require.NotZero(t, st)
	_, err = StartTicks(1 << 30)
	require.Error(t, err)
}

func TestState(t *testing.T) {
	st, err := State(os.Getpid())
	require.NoError(t, err)
	require.Contains(t, "RS", string(st), "this test is running or sleeping")
	_, err = State(1 << 30)
	require.Error(t, err)
	// A stopped child reads T, and a dead one not yet reaped reads Z.
	h, err := New(t.TempDir()).Start(context.Background(), engine.Command{Name: "sleep", Path: "/bin/sleep", Args: []string{"30"}})
	require.NoError(t, err)
	defer h.Stop(context.Background(), time.Second) //nolint:errcheck
	require.NoError(t, syscall.Kill(h.Pid(), syscall.SIGSTOP))
	require.Eventually(t, func() bool { st, _ := State(h.Pid()); return st == 'T' }, 5*time.Second, 10*time.Millisecond)
	require.NoError(t, syscall.Kill(h.Pid(), syscall.SIGCONT))
}
