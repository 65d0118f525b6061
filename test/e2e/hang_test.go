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
