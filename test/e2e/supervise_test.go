package e2e

import (
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/internal/devcluster"
)

// TestWorkerRayKilledStopsGroup: SIGKILL of a worker's `ray` process (its
// agent stays up) stops the whole group within 5 s (the head's vllm and ray
// are gone) and the group restarts and serves again.
func TestWorkerRayKilledStopsGroup(t *testing.T) {
	e := startCluster(t, 25, 2)
	before := e.oneReplica()
	var worker string
	for _, m := range before.Members {
		if m != before.Head {
			worker = m
		}
	}
	headPids := e.c.EnginePids(before.Head)
	require.Len(t, headPids, 2)
	wp := e.c.EnginePids(worker)
	require.Len(t, wp, 1)
	killed := time.Now()
	require.NoError(t, syscall.Kill(wp[0], syscall.SIGKILL))
	require.Eventually(t, func() bool { return !alive(headPids[0]) && !alive(headPids[1]) }, 5*time.Second, 50*time.Millisecond,
		"the head's ray and vllm stop within 5 s of a worker's ray dying")
	stopped := time.Since(killed)
	require.Eventually(t, func() bool {
		if readyCount(e.replicas()) != 1 {
			return false
		}
		r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"hi","max_tokens":2}`))
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	}, 60*time.Second, 200*time.Millisecond)
	t.Logf("WORKER RAY KILLED: group stopped %.2fs after the kill, serving again after %.2fs", stopped.Seconds(), time.Since(killed).Seconds())
	out, err := e.shoal("describe", "deployment", "demo")
	require.NoError(t, err)
	require.Contains(t, out, "ray exited", "the reason is recorded: %s", out)
}

// TestNeverReadyStartupIsBounded: vLLM hangs in NCCL init (the simulator's
// nccl-hang: nothing logged, the port never opens); the startup timeout of
// the spec bounds it and the reason says so.
func TestNeverReadyStartupIsBounded(t *testing.T) {
	e := startCluster(t, 26, 2, func(c *devcluster.Config) { c.SimEnv = append(c.SimEnv, "SHOAL_SIM_FAULT=nccl-hang") })
	e.apply("hang.yaml", strings.NewReplacer("count: 2", "count: 1", "startupTimeoutSeconds: 60", "startupTimeoutSeconds: 4").Replace(spec2x2))
	applied := time.Now()
	var out string
	require.Eventually(t, func() bool {
		out, _ = e.shoal("describe", "deployment", "demo")
		return strings.Contains(out, "engine not ready within 4s")
	}, 30*time.Second, 250*time.Millisecond)
	t.Logf("NEVER READY: failed with a reason %.2fs after apply (startup timeout 4 s)", time.Since(applied).Seconds())
	require.Zero(t, readyCount(e.replicas()))
}
