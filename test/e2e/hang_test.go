package e2e

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestEngineHangDetected: the simulator's no-token hang (vllm#53157: /health
// 200, /v1/models 200, nothing generated) with a request running makes the
// head fail the replica after the hang timeout (4 s in dev clusters), and the
// group restarts and serves again.
func TestEngineHangDetected(t *testing.T) {
	e := startCluster(t, 14, 2)
	r0 := e.oneReplica()
	resp, err := http.Post("http://"+r0.Endpoint+"/shoal-sim/faults", "application/json", strings.NewReader(`{"mode":"hang"}`))
	require.NoError(t, err)
	resp.Body.Close()
	hung := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() { // a request that will never get a token
		req, _ := http.NewRequestWithContext(ctx, "POST", "http://"+r0.Endpoint+"/v1/completions", strings.NewReader(`{"model":"demo","prompt":"x","max_tokens":5}`))
		if r, err := http.DefaultClient.Do(req); err == nil {
			r.Body.Close()
		}
	}()
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 0 }, 20*time.Second, 100*time.Millisecond, "hung engine detected")
	detected := time.Since(hung)
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 60*time.Second, 200*time.Millisecond, "restarted")
	t.Logf("HANG: detected %.2fs after the hang began (timeout 4 s), serving again after %.2fs", detected.Seconds(), time.Since(hung).Seconds())
	require.GreaterOrEqual(t, detected, 4*time.Second, "not before the timeout")
	r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"x","max_tokens":2}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode)
}

// TestIdleCanaryFindsSilentWorkerDeath: a Ray worker dies silently
// (vllm#16259: /health stays 200 until a step runs) on an idle replica; the
// head's idle canary runs a step, the engine dies, the group restarts.
func TestIdleCanaryFindsSilentWorkerDeath(t *testing.T) {
	e := startCluster(t, 17, 2)
	r0 := e.oneReplica()
	resp, err := http.Post("http://"+r0.Endpoint+"/shoal-sim/faults", "application/json", strings.NewReader(`{"mode":"worker-dead"}`))
	require.NoError(t, err)
	resp.Body.Close()
	injected := time.Now()
	h, err := http.Get("http://" + r0.Endpoint + "/health")
	require.NoError(t, err)
	h.Body.Close()
	require.Equal(t, 200, h.StatusCode, "the fault is silent")
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 0 }, 20*time.Second, 100*time.Millisecond, "idle canary found it")
	detected := time.Since(injected)
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 60*time.Second, 200*time.Millisecond)
	t.Logf("CANARY: silent worker death on an idle replica detected after %.2fs (canary every 3 s), serving again after %.2fs",
		detected.Seconds(), time.Since(injected).Seconds())
}
