package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// torchPython is a python3 that imports torch, or skips the test.
func torchPython(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(p, "-c", "import torch").Run() == nil {
			return p
		}
	}
	t.Skip("no python3 with torch here (.ci/run installs Debian's python3-torch): the command-engine tests need it")
	return ""
}

// TestCommandEngineTorch runs examples/torch-tp (a real torch.distributed
// program; gloo on this CPU machine, NCCL on GPUs) through the command engine
// kind on two agents: rank 0 on the elected head, a completion computed by
// both ranks, then kill -9 of the worker rank: the group stops and restarts
// whole and serves again, with no orphan process.
func TestCommandEngineTorch(t *testing.T) {
	py := torchPython(t)
	e := startCluster(t, 13, 2)
	abs, err := filepath.Abs("../../examples/torch-tp/engine.py")
	require.NoError(t, err)
	b, err := os.ReadFile("../../examples/torch-tp/deployment.yaml")
	require.NoError(t, err)
	e.apply("torch.yaml", strings.Replace(strings.ReplaceAll(string(b), "ENGINE_PY", abs), `["python3",`, `["`+py+`",`, 1))
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 120*time.Second, 200*time.Millisecond)
	r0 := e.replicas()[0]

	complete := func() (int, map[string]any) {
		resp, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"torch-tp","prompt":"hello","max_tokens":8}`))
		if err != nil {
			return 0, nil
		}
		defer resp.Body.Close()
		var v map[string]any
		b, _ := io.ReadAll(resp.Body)
		_ = json.Unmarshal(b, &v)
		return resp.StatusCode, v
	}
	code, v := complete()
	require.Equal(t, 200, code, "%v", v)
	require.Len(t, v["token_ids"], 8)
	require.Equal(t, 2.0, v["ranks"], "the work ran on both ranks")

	// kill -9 the worker rank's process (not its agent).
	var worker string
	for _, n := range e.nodes() {
		if n.Role == "worker" {
			worker = n.NodeID
		}
	}
	require.NotEmpty(t, worker)
	pids := e.c.EnginePids(worker)
	require.Len(t, pids, 1)
	require.NoError(t, syscall.Kill(pids[0], syscall.SIGKILL))
	killed := time.Now()
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 0 }, 10*time.Second, 50*time.Millisecond, "head reports NOT_SERVING")
	notServing := time.Since(killed)
	require.Eventually(t, func() bool {
		rs := e.replicas()
		return len(rs) == 1 && rs[0].State == "ready"
	}, 120*time.Second, 200*time.Millisecond)
	back := time.Since(killed)
	rs := e.replicas()
	require.Equal(t, r0.Epoch, rs[0].Epoch, "same members, same epoch: the group restarted in place")
	code, v = complete()
	require.Equal(t, 200, code, "%v", v)
	t.Logf("TORCH: worker rank killed; replica not serving after %.2fs, serving again after %.2fs", notServing.Seconds(), back.Seconds())
	// No orphan: exactly one engine process per member, all recorded and alive.
	all := append(e.c.EnginePids("node-1"), e.c.EnginePids("node-2")...)
	require.Len(t, all, 2)
	require.NotContains(t, all, pids[0])
	for _, p := range all {
		require.NoError(t, syscall.Kill(p, 0))
	}
	outPs, _ := exec.Command("pgrep", "-f", abs).Output()
	require.Len(t, strings.Fields(string(outPs)), 2, "only the two live ranks run engine.py")
}

// TestCommandEnginePD runs examples/torch-pd (a real torch program that
// speaks vLLM's NixlConnector protocol; tcp transport on this CPU machine)
// as a deployment with roles on two agents: a request through the router
// prefills on one engine, its KV moves to the other over the side channel,
// and the answer (tokens and the KV's digest) is the one the decode engine
// gives alone. The pair warm-up paid the handshake. Then the prefill engine
// is killed between the two hops: the decode hop fails cleanly (vLLM's
// kv_load_failure_policy=fail) with its KV freed, and the pair serves again
// once the prefill role is re-formed.
func TestCommandEnginePD(t *testing.T) {
	py := torchPython(t)
	e := startCluster(t, 41, 2)
	abs, err := filepath.Abs("../../examples/torch-pd/engine.py")
	require.NoError(t, err)
	b, err := os.ReadFile("../../examples/torch-pd/deployment.yaml")
	require.NoError(t, err)
	// The simulated agents have 8 GPUs each: a role takes a whole node, so
	// the two engines run on two agents as on two GPU hosts.
	doc := strings.NewReplacer("ENGINE_PY", abs, `["python3",`, `["`+py+`",`, "gpusPerNode: 1", "gpusPerNode: 8").Replace(string(b))
	e.apply("torch-pd.yaml", doc)
	ready := func(dep string) bool { return e.count(dep, "ready") == 1 }
	require.Eventually(t, func() bool { return ready("torch-pd-prefill") && ready("torch-pd-decode") }, 120*time.Second, 200*time.Millisecond)
	p, d := e.replicasOf("torch-pd-prefill")[0], e.replicasOf("torch-pd-decode")[0]
	require.NotEqual(t, p.Head, d.Head, "the roles run on two agents")

	prompt := strings.Repeat("shoal moves this prompt's KV between engines. ", 12)
	post := func(addr string, body map[string]any) (int, map[string]any) {
		bb, _ := json.Marshal(body)
		resp, err := http.Post("http://"+addr+"/v1/completions", "application/json", strings.NewReader(string(bb)))
		if err != nil {
			return 0, map[string]any{"error": err.Error()}
		}
		defer resp.Body.Close()
		var v map[string]any
		raw, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(raw, &v) != nil {
			v = map[string]any{"raw": string(raw)}
		}
		return resp.StatusCode, v
	}
	req := map[string]any{"model": "torch-pd", "prompt": prompt, "max_tokens": 8}
	var code int
	var v map[string]any
	require.Eventually(t, func() bool { code, v = post(e.router, req); return code == 200 }, 60*time.Second, 200*time.Millisecond, "the router serves the pair once it is warmed")
	ex := v["shoal_example"].(map[string]any)
	require.Equal(t, "decode", ex["role"], "the decode engine answered")
	kv, ok := ex["kv_transfer"].(map[string]any)
	require.True(t, ok, "the answer's KV was pulled from the prefill engine: %v", ex)
	require.Equal(t, "tcp", kv["transport"])
	require.Equal(t, float64(len(prompt)-1), kv["tokens"], "all of the prompt's KV but the last token's moved")
	require.Greater(t, kv["bytes"], 0.0)
	require.Zero(t, kv["handshake_seconds"], "the pair warm-up paid the side channel's handshake, not the first request")
	code, local := post(d.Endpoint, req)
	require.Equal(t, 200, code, "%v", local)
	require.Equal(t, local["token_ids"], v["token_ids"], "the disaggregated answer is the local one")
	require.Equal(t, local["shoal_example"].(map[string]any)["kv_digest"], ex["kv_digest"], "the pulled KV is the KV the decode engine computes itself")

	// The prefill engine dies between the two hops.
	pre := map[string]any{"model": "torch-pd", "prompt": prompt, "max_tokens": 1, "kv_transfer_params": map[string]any{"do_remote_decode": true}}
	code, pv := post(p.Endpoint, pre)
	require.Equal(t, 200, code, "%v", pv)
	pids := e.c.EnginePids(p.Head)
	require.Len(t, pids, 1)
	require.NoError(t, syscall.Kill(pids[0], syscall.SIGKILL))
	dec := map[string]any{"model": "torch-pd", "prompt": prompt, "max_tokens": 8, "kv_transfer_params": pv["kv_transfer_params"]}
	code, dv := post(d.Endpoint, dec)
	require.Equal(t, 500, code, "%v", dv)
	require.Contains(t, fmt.Sprint(dv["error"]), "Failed to load KV cache from the remote prefill engine (kv_load_failure_policy=fail)")
	dm := "http://" + d.Endpoint + "/metrics"
	use, found, err := scrapeSum(dm, "vllm:kv_cache_usage_perc")
	require.NoError(t, err)
	require.True(t, found && use == 0, "the failed request's blocks are free (KV use %v, reported: %v)", use, found)
	require.Equal(t, 1.0, metricSum(t, dm, "torchpd:kv_pull_failures_total"))
	// The prefill role is re-formed (a new engine: a new engine id, a new
	// handshake) and the pair serves again: with P down the router's answer
	// is the decode engine's alone (no kv_transfer), so wait for a pull.
	require.Eventually(t, func() bool {
		code, v = post(e.router, req)
		ex, _ := v["shoal_example"].(map[string]any)
		return code == 200 && ex["kv_transfer"] != nil
	}, 120*time.Second, 300*time.Millisecond, "a routed answer whose KV came from the re-formed prefill engine")
	require.Equal(t, local["token_ids"], v["token_ids"])
	require.NotContains(t, e.c.EnginePids(p.Head), pids[0])
}
