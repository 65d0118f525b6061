package e2e

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const autoSpec = `apiVersion: shoal/v1
kind: Deployment
name: auto
model: {source: /models/auto}
engine: {kind: ray-vllm, servedModelName: auto, tensorParallelSize: 8, pipelineParallelSize: 1, startupTimeoutSeconds: 60}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {min: 1, max: 4}
autoscaling: {policy: kpa, metric: num_requests_running, target: 8, stableWindowSeconds: 6, panicWindowSeconds: 2, scaleDownDelaySeconds: 6}
`

const zeroSpec = `apiVersion: shoal/v1
kind: Deployment
name: zero
model: {source: /models/zero}
engine: {kind: ray-vllm, servedModelName: zero, tensorParallelSize: 8, pipelineParallelSize: 1, startupTimeoutSeconds: 60}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {min: 0, max: 1}
autoscaling: {policy: kpa, metric: num_requests_running, target: 8, stableWindowSeconds: 6, panicWindowSeconds: 2, scaleDownDelaySeconds: 30}
`

func (e *env) count(dep string, state string) int {
	n := 0
	for _, r := range e.replicasOf(dep) {
		if state == "" || r.State == state {
			n++
		}
	}
	return n
}

func (e *env) replicasOf(dep string) []replica {
	out, err := e.shoal("get", "replicas", "-o", "json", dep)
	if err != nil {
		return nil
	}
	var r struct {
		Replicas []replica `json:"replicas"`
	}
	_ = jsonUnmarshal(out, &r)
	return r.Replicas
}

// TestAutoscaling: 6 agents. Scale from zero serves a held request; a load
// step doubles replicas within seconds; when the load goes, replicas drain
// back to min with no failed request.
func TestAutoscaling(t *testing.T) {
	e := startCluster(t, 12, 6)
	e.apply("zero.yaml", zeroSpec)
	e.apply("auto.yaml", autoSpec)
	hc := &http.Client{Timeout: 90 * time.Second}

	// Scale from zero: no replica; the router holds the request while one forms.
	require.Equal(t, 0, e.count("zero", ""))
	t0 := time.Now()
	resp, err := hc.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"zero","prompt":"x","max_tokens":2}`))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode, "the held request is served once a replica is ready")
	t.Logf("AUTOSCALE: scale from zero served the first (held) request after %.2fs", time.Since(t0).Seconds())

	require.Eventually(t, func() bool { return e.count("auto", "ready") == 1 }, 60*time.Second, 200*time.Millisecond)

	// Load step: 40 long streams on one replica (target 8 running each).
	ctx, stopLoad := context.WithCancel(context.Background())
	var ok, failed atomic.Int64
	var wg sync.WaitGroup
	burst := time.Now()
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				req, _ := http.NewRequest("POST", "http://"+e.router+"/v1/completions",
					strings.NewReader(`{"model":"auto","prompt":"load","max_tokens":120,"ignore_eos":true}`))
				r, err := hc.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				r.Body.Close()
				if r.StatusCode == 200 {
					ok.Add(1)
				} else {
					failed.Add(1)
				}
			}
		}()
	}
	require.Eventually(t, func() bool { return e.count("auto", "") >= 2 }, 30*time.Second, 100*time.Millisecond)
	doubled := time.Since(burst)
	require.Eventually(t, func() bool { return e.count("auto", "ready") >= 2 }, 60*time.Second, 100*time.Millisecond)
	t.Logf("AUTOSCALE: replicas doubled (placed) %.2fs and ready %.2fs after the load step", doubled.Seconds(), time.Since(burst).Seconds())
	require.Less(t, doubled, 4*time.Second, "a load step must double replicas within 4 s")
	time.Sleep(4 * time.Second)
	out, err := e.shoal("describe", "deployment", "auto")
	require.NoError(t, err)
	require.Contains(t, out, "Autoscaler: kpa on num_requests_running")
	require.Contains(t, out, "AlgorithmRun kpa: currentReplicas: 1")
	// Router requests are counted when they complete: poll until a load request has.
	require.Eventually(t, func() bool {
		mr, err := http.Get("http://" + e.router + "/metrics")
		if err != nil {
			return false
		}
		mb, _ := io.ReadAll(mr.Body)
		mr.Body.Close()
		return strings.Contains(string(mb), `shoal_autoscaler_desired_replicas{deployment="auto"}`) &&
			strings.Contains(string(mb), `shoal_router_requests_total{code="200",model="auto"`)
	}, 30*time.Second, 200*time.Millisecond, "autoscaler and router metrics on the router's /metrics")

	// Load removed: back to min after the delay, every request answered.
	stopLoad()
	wg.Wait()
	removed := time.Now()
	require.Eventually(t, func() bool { return e.count("auto", "") == 1 }, 90*time.Second, 200*time.Millisecond)
	t.Logf("AUTOSCALE: back to 1 replica %.2fs after the load stopped; %d requests ok, %d failed", time.Since(removed).Seconds(), ok.Load(), failed.Load())
	require.Zero(t, failed.Load(), "no request may fail across scale-out and drained scale-in")
	require.Greater(t, ok.Load(), int64(40))
	out, err = e.shoal("describe", "deployment", "auto")
	require.NoError(t, err)
	require.Contains(t, out, "SuccessfulRescale: released replica")
}

// TestAutoscalingSteadyNoReversals: 12 steady streams against a target of 8
// running per replica want 2 replicas; over 10 stable windows (6 s each, as
// 10 minutes are at the default 60 s window) the count never changes again.
func TestAutoscalingSteadyNoReversals(t *testing.T) {
	if testing.Short() {
		t.Skip("a minute of steady load")
	}
	e := startCluster(t, 15, 3)
	e.apply("auto.yaml", autoSpec)
	require.Eventually(t, func() bool { return e.count("auto", "ready") == 1 }, 60*time.Second, 200*time.Millisecond)
	hc := &http.Client{Timeout: 60 * time.Second}
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				r, err := hc.Post("http://"+e.router+"/v1/completions", "application/json",
					strings.NewReader(`{"model":"auto","prompt":"steady","max_tokens":80,"ignore_eos":true}`))
				if err != nil || r.StatusCode != 200 {
					failed.Add(1)
				}
				if r != nil {
					r.Body.Close()
				}
			}
		}()
	}
	require.Eventually(t, func() bool { return e.count("auto", "ready") == 2 }, 60*time.Second, 200*time.Millisecond)
	time.Sleep(8 * time.Second) // let the windows fill at the new size
	before, _ := e.shoal("describe", "deployment", "auto")
	runs := strings.Count(before, "AlgorithmRun")
	for i := 0; i < 60; i++ {
		if n := e.count("auto", ""); n != 2 {
			out, _ := e.shoal("describe", "deployment", "auto")
			t.Fatalf("steady load changed the replica count to %d (second %d):\n%s", n, i, out)
		}
		time.Sleep(time.Second)
	}
	after, _ := e.shoal("describe", "deployment", "auto")
	stop()
	wg.Wait()
	require.Equal(t, runs, strings.Count(after, "AlgorithmRun"), "no rescale decision during the steady minute:\n%s", after)
	require.Zero(t, failed.Load())
	t.Logf("AUTOSCALE: 60 s (10 stable windows) of steady load at 12 streams: 2 replicas throughout, no rescale, 0 failed requests")
}
