// Package enginetest is the conformance suite every engine runtime passes
// (engine/process, engine/containerd), run against the simulator: start,
// readiness, log capture, graceful stop, crash exit code, a failing start,
// exec beside the engine, and re-adoption by a second runtime instance (as a
// restarted agent does).
package enginetest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
)

// Setup is one runtime under test.
type Setup struct {
	Runtime engine.Runtime
	// Reopen returns a fresh instance of the runtime over the same state, as
	// a restarted agent would create.
	Reopen func(t *testing.T) engine.Runtime
	// VLLM is the vllm executable as the runtime resolves it (a simulator
	// link for process, "vllm" on the image's PATH for containerd).
	VLLM string
	// Container is passed on every command (the image, for containerd).
	Container engine.Container
	// Env is added to every command (simulator settings).
	Env []string
}

// Run runs the suite.
func Run(t *testing.T, s Setup) {
	t.Run("ServeLogStop", func(t *testing.T) { serveLogStop(t, s) })
	t.Run("CrashExitCode", func(t *testing.T) { crashExitCode(t, s) })
	t.Run("BadArgumentsExit", func(t *testing.T) { badArguments(t, s) })
	t.Run("Exec", func(t *testing.T) { execBeside(t, s) })
	t.Run("Adopt", func(t *testing.T) { adopt(t, s) })
	t.Run("AdoptGone", func(t *testing.T) { adoptGone(t, s) })
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s Setup) serve(t *testing.T, name string, port int, extra ...string) engine.Handle {
	t.Helper()
	c := engine.Command{Name: name, Path: s.VLLM, Container: s.Container,
		Args: append([]string{"serve", "/models/sim-8b", "--served-model-name", "sim-8b", "--host", "127.0.0.1", "--port", strconv.Itoa(port)}, extra...),
		Env:  append([]string{"SHOAL_SIM_LOAD_SECONDS=0.2", "SHOAL_SIM_CHECK=" + name}, s.Env...)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h, err := s.Runtime.Start(ctx, c)
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Stop(context.Background(), time.Second) })
	require.Positive(t, h.Pid())
	return h
}

func waitReady(t *testing.T, h engine.Handle, port int) {
	t.Helper()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-h.Done():
			b, _ := os.ReadFile(h.LogPath())
			t.Fatalf("engine exited before ready (%v); log:\n%s", h.Err(), b)
		default:
		}
		if r, err := http.Get(base + "/v1/models"); err == nil {
			b := new(bytes.Buffer)
			_, _ = b.ReadFrom(r.Body)
			r.Body.Close()
			if r.StatusCode == 200 && strings.Contains(b.String(), `"sim-8b"`) {
				return
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(h.LogPath())
			t.Fatalf("engine not ready in 30s; log:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func waitDone(t *testing.T, h engine.Handle, d time.Duration) {
	t.Helper()
	select {
	case <-h.Done():
	case <-time.After(d):
		t.Fatalf("%s did not exit within %v", h.Name(), d)
	}
}

func portClosed(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

func serveLogStop(t *testing.T, s Setup) {
	port := freePort(t)
	h := s.serve(t, "vllm-serve", port)
	waitReady(t, h, port)
	// A completion runs through the engine.
	r, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/v1/completions", port), "application/json",
		strings.NewReader(`{"model":"sim-8b","prompt":"hello","max_tokens":3}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode)

	log, err := os.ReadFile(h.LogPath())
	require.NoError(t, err)
	require.Contains(t, string(log), "shoal: starting", "the runtime's own start line")
	require.Contains(t, string(log), "Application startup complete", "the engine's output is captured")

	start := time.Now()
	require.NoError(t, h.Stop(context.Background(), 10*time.Second))
	waitDone(t, h, time.Second)
	require.Less(t, time.Since(start), 10*time.Second, "SIGTERM ends the simulator before the grace")
	require.Equal(t, 0, engine.ExitCode(h.Err()), "a graceful stop exits 0: %v", h.Err())
	require.True(t, portClosed(port))
	require.NoError(t, h.Stop(context.Background(), time.Second), "Stop is idempotent")
}

func crashExitCode(t *testing.T, s Setup) {
	port := freePort(t)
	h := s.serve(t, "vllm-crash", port)
	waitReady(t, h, port)
	r, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/shoal-sim/faults", port), "application/json", strings.NewReader(`{"mode":"die"}`))
	require.NoError(t, err)
	r.Body.Close()
	waitDone(t, h, 20*time.Second)
	var ee *engine.ExitError
	require.True(t, errors.As(h.Err(), &ee), "an engine death is an ExitError: %v", h.Err())
	require.Equal(t, 1, ee.Code, "vLLM exits 1 after EngineDeadError")
	log, err := os.ReadFile(h.LogPath())
	require.NoError(t, err)
	require.Contains(t, string(log), "EngineDeadError")
	require.NoError(t, h.Stop(context.Background(), time.Second))
}

func badArguments(t *testing.T, s Setup) {
	h := s.serve(t, "vllm-bad", freePort(t), "--distributed-executor-backend", "nccl")
	waitDone(t, h, 20*time.Second)
	require.Equal(t, 2, engine.ExitCode(h.Err()), "argparse errors exit 2: %v", h.Err())
	log, err := os.ReadFile(h.LogPath())
	require.NoError(t, err)
	require.Contains(t, string(log), "invalid choice: 'nccl'")
}

func execBeside(t *testing.T, s Setup) {
	port := freePort(t)
	h := s.serve(t, "vllm-exec", port)
	waitReady(t, h, port)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := s.Runtime.Exec(ctx, h, engine.Command{Name: "vllm", Path: s.VLLM, Args: []string{"--version"}})
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "0.")
}

func adopt(t *testing.T, s Setup) {
	port := freePort(t)
	h := s.serve(t, "vllm-adopt", port)
	waitReady(t, h, port)
	rec := h.Record()
	b, err := json.Marshal(rec)
	require.NoError(t, err)
	var back engine.Record
	require.NoError(t, json.Unmarshal(b, &back), "records survive the state file")

	rt2 := s.Reopen(t)
	require.Equal(t, s.Runtime.Kind(), rt2.Kind())
	h2, err := rt2.Adopt(context.Background(), back)
	require.NoError(t, err)
	require.Equal(t, h.Pid(), h2.Pid(), "the same engine, not a new one")
	require.Equal(t, h.LogPath(), h2.LogPath())
	select {
	case <-h2.Done():
		t.Fatal("an adopted running engine is not done")
	default:
	}
	// It still serves, and its output still reaches the log.
	r, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/v1/completions", port), "application/json",
		strings.NewReader(`{"model":"sim-8b","prompt":"still there","max_tokens":2}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode)

	// The new instance stops it; both handles see the end.
	require.NoError(t, h2.Stop(context.Background(), 10*time.Second))
	waitDone(t, h2, time.Second)
	waitDone(t, h, 10*time.Second)
	require.True(t, portClosed(port))
	_, err = rt2.Adopt(context.Background(), back)
	require.ErrorIs(t, err, engine.ErrGone, "a stopped engine cannot be adopted")
}

func adoptGone(t *testing.T, s Setup) {
	h := s.serve(t, "vllm-gone", freePort(t), "--distributed-executor-backend", "nccl")
	waitDone(t, h, 20*time.Second)
	rec := h.Record()
	_, err := s.Reopen(t).Adopt(context.Background(), rec)
	require.ErrorIs(t, err, engine.ErrGone, "an exited engine is gone: %v", err)
}
