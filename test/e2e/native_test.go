package e2e

import (
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const vllmNativeSpec = `apiVersion: shoal/v1
kind: Deployment
name: native
model: {source: /models/native}
engine: {kind: vllm, servedModelName: native, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {count: 1}
`

const sglangSpec = `apiVersion: shoal/v1
kind: Deployment
name: sg
model: {source: /models/sg}
engine: {kind: sglang, servedModelName: sg, tensorParallelSize: 16, pipelineParallelSize: 1, port: 30000, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {count: 1}
`

// TestNativeEngines: vLLM native multi-node (--nnodes/--headless) and SGLang
// (--dist-init-addr) replicas serve through the router. Then the native
// head's vllm dies: the headless rank would not exit by itself (vllm#32136),
// so its agent stops it, and the group restarts and serves again.
func TestNativeEngines(t *testing.T) {
	e := startCluster(t, 16, 4)
	e.apply("native.yaml", vllmNativeSpec)
	e.apply("sg.yaml", sglangSpec)
	require.Eventually(t, func() bool { return e.count("native", "ready") == 1 && e.count("sg", "ready") == 1 }, 90*time.Second, 200*time.Millisecond)
	for _, m := range []string{"native", "sg"} {
		r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"`+m+`","prompt":"hi","max_tokens":3}`))
		require.NoError(t, err)
		r.Body.Close()
		require.Equal(t, 200, r.StatusCode, m)
	}
	rep := e.replicasOf("native")[0]
	var worker string
	for _, id := range rep.Members {
		if id != rep.Head {
			worker = id
		}
	}
	// Engine logs through the coordinator: the head's by default, a member's by --node.
	out, err := e.shoal("logs", rep.GroupID)
	require.NoError(t, err, out)
	require.Contains(t, out, "==> "+rep.Head+" vllm.log <==")
	require.Contains(t, out, "Application startup complete.")
	out, err = e.shoal("logs", rep.GroupID, "--node", worker, "--name", "vllm")
	require.NoError(t, err, out)
	require.Contains(t, out, "Headless node rank 1 joined")
	out, err = e.shoal("logs", rep.GroupID, "--name", "nope")
	require.Error(t, err)
	require.Contains(t, out, `no engine log "nope"`)
	out, err = e.shoal("logs", "no-such-replica")
	require.Error(t, err)
	require.Contains(t, out, "not found")
	headPids, workerPids := e.c.EnginePids(rep.Head), e.c.EnginePids(worker)
	require.NotEmpty(t, headPids, "the head recorded its engine")
	require.NotEmpty(t, workerPids, "the worker recorded its engine")
	headPid, workerPid := headPids[0], workerPids[0]
	require.NoError(t, syscall.Kill(headPid, syscall.SIGKILL))
	killed := time.Now()
	require.Eventually(t, func() bool { return syscall.Kill(workerPid, 0) != nil }, 15*time.Second, 50*time.Millisecond,
		"the headless rank must be stopped by its agent")
	t.Logf("NATIVE: headless rank stopped %.2fs after its head died", time.Since(killed).Seconds())
	require.Eventually(t, func() bool { return e.count("native", "ready") == 1 }, 60*time.Second, 200*time.Millisecond)
	r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"native","prompt":"hi","max_tokens":3}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode)
	t.Logf("NATIVE: serving again %.2fs after the head's vllm died", time.Since(killed).Seconds())
}
