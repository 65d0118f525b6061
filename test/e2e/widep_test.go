package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/stretchr/testify/require"
)

// wideEPSpec is a DP16 × EP group on 2 nodes × 8 GPUs with load balancing lb.
func wideEPSpec(name, kind, lb string, port int) string {
	dp := fmt.Sprintf("dataParallel: {size: 16, loadBalancing: %s}", lb)
	return fmt.Sprintf(`apiVersion: shoal/v1
kind: Deployment
name: %s
model: {source: /models/deepseek-r1}
engine: {kind: %s, servedModelName: %s, port: %d, startupTimeoutSeconds: 60, %s,
  expertParallel: {enabled: true, eplb: {redundantExperts: 32}}}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {count: 1}
`, name, kind, name, port, dp)
}

// completeVia sends one completion for model through the router.
func completeVia(t *testing.T, router, model string) {
	t.Helper()
	r, err := http.Post("http://"+router+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"`+model+`","prompt":"hello","max_tokens":3}`))
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode, "%s: %s", model, b)
}

// engineMetrics reads an API server's /metrics directly.
func engineMetrics(t *testing.T, addr string) engine.Metrics {
	t.Helper()
	r, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer r.Body.Close()
	m, err := engine.ParseVLLMMetrics(r.Body)
	require.NoError(t, err)
	return m
}

// TestWideEPGroups: DP16 × EP groups of 2 nodes serve through the router
// in every load-balancing mode — internal (one API server on the head, the
// other node headless), hybrid (a server per node; the router reaches the
// worker's ranks too, pinning each request with X-data-parallel-rank) and
// external (a server per rank) — and SGLang's DP attention. Then a rank of
// the hybrid group dies: the whole group stops within 5 s and re-forms.
func TestWideEPGroups(t *testing.T) {
	e := startCluster(t, 32, 5)
	e.apply("internal.yaml", wideEPSpec("ep-internal", "vllm", "internal", 8000))
	e.apply("hybrid.yaml", wideEPSpec("ep-hybrid", "vllm", "hybrid", 8100))
	require.Eventually(t, func() bool { return e.count("ep-internal", "ready") == 1 && e.count("ep-hybrid", "ready") == 1 },
		90*time.Second, 200*time.Millisecond)
	for i := 0; i < 4; i++ {
		completeVia(t, e.router, "ep-internal")
	}
	// Hybrid: enough requests that ranks on both nodes get some.
	for i := 0; i < 40; i++ {
		completeVia(t, e.router, "ep-hybrid")
	}
	rep := e.replicasOf("ep-hybrid")[0]
	addrs := map[string]string{}
	for _, n := range e.nodes() {
		addrs[n.NodeID] = n.Address
	}
	var worker string
	for _, id := range rep.Members {
		if id != rep.Head {
			worker = id
		}
	}
	wm := engineMetrics(t, net.JoinHostPort(addrs[worker], "8100"))
	require.Positive(t, wm.GenerationTokens, "the router reached the worker node's ranks")
	require.Len(t, wm.Ranks, 8, "the worker's server fronts ranks 8-15")
	hm := engineMetrics(t, net.JoinHostPort(addrs[rep.Head], "8100"))
	require.Positive(t, hm.GenerationTokens)
	for _, k := range []string{"0", "7"} {
		require.Contains(t, hm.Ranks, k)
	}
	out, err := e.shoal("describe", "deployment", "ep-hybrid")
	require.NoError(t, err, out)
	require.Contains(t, out, "DP ranks of "+rep.GroupID)
	require.Regexp(t, `(?m)^\s+15\s+`+regexp.QuoteMeta(net.JoinHostPort(addrs[worker], "8100")), out, "rank 15 is on the worker's server")
	out, err = e.shoal("logs", rep.GroupID, "--node", worker, "--name", "vllm")
	require.NoError(t, err, out)
	require.Contains(t, out, "ranks 8-15 of 16")

	// A rank of the hybrid group dies (the worker's engine process).
	headPids, workerPids := e.c.EnginePids(rep.Head), e.c.EnginePids(worker)
	require.NotEmpty(t, headPids)
	require.NotEmpty(t, workerPids)
	require.NoError(t, syscall.Kill(workerPids[0], syscall.SIGKILL))
	killed := time.Now()
	require.Eventually(t, func() bool { return syscall.Kill(headPids[0], 0) != nil }, 5*time.Second, 25*time.Millisecond,
		"fate sharing: the head's ranks are stopped once a peer rank died")
	t.Logf("WIDE-EP: group stopped %.2fs after a rank died", time.Since(killed).Seconds())
	require.Eventually(t, func() bool { return e.count("ep-hybrid", "ready") == 1 }, 60*time.Second, 200*time.Millisecond)
	completeVia(t, e.router, "ep-hybrid")
	t.Logf("WIDE-EP: serving again %.2fs after the rank died", time.Since(killed).Seconds())

	// External load balancing, then SGLang, on the nodes the internal group frees.
	_, err = e.shoal("delete", "deployment", "ep-internal")
	require.NoError(t, err)
	e.apply("external.yaml", wideEPSpec("ep-external", "vllm", "external", 8200))
	require.Eventually(t, func() bool { return e.count("ep-external", "ready") == 1 }, 90*time.Second, 200*time.Millisecond)
	for i := 0; i < 32; i++ {
		completeVia(t, e.router, "ep-external")
	}
	rep = e.replicasOf("ep-external")[0]
	served := 0
	for _, id := range rep.Members {
		for p := 8200; p < 8208; p++ {
			if engineMetrics(t, net.JoinHostPort(addrs[id], fmt.Sprint(p))).GenerationTokens > 0 {
				served++
			}
		}
	}
	require.Greater(t, served, 8, "requests reach ranks on both nodes, one server per rank")

	// A member host of the external group dies: the group re-forms on a
	// spare under a new epoch, with its DP coordinator on a fresh port.
	var gone string
	for _, id := range rep.Members {
		if id != rep.Head {
			gone = id
		}
	}
	require.NoError(t, e.c.Kill(gone))
	require.Eventually(t, func() bool {
		rs := e.replicasOf("ep-external")
		return len(rs) == 1 && rs[0].State == "ready" && rs[0].Epoch != rep.Epoch
	}, 90*time.Second, 200*time.Millisecond)
	completeVia(t, e.router, "ep-external")
	re := e.replicasOf("ep-external")[0]
	b, err := os.ReadFile(filepath.Join(e.dir, "logs", re.Head+".log"))
	require.NoError(t, err)
	ports := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "engine process started") && strings.Contains(l, "group="+re.GroupID+" epoch="+re.Epoch+" ") {
			_, after, ok := strings.Cut(l, "--data-parallel-rpc-port ")
			require.True(t, ok, l)
			port, _, _ := strings.Cut(after, " ")
			ports[port] = true
		}
	}
	require.NotEmpty(t, ports, "the re-formed group's processes on its head")
	require.NotContains(t, ports, "29550", "a new epoch moves the DP coordinator to a fresh port: %v", ports)
	_, err = e.shoal("delete", "deployment", "ep-external")
	require.NoError(t, err)
	e.apply("sglang.yaml", wideEPSpec("ep-sglang", "sglang", "internal", 8300))
	require.Eventually(t, func() bool { return e.count("ep-sglang", "ready") == 1 }, 90*time.Second, 200*time.Millisecond)
	completeVia(t, e.router, "ep-sglang")
}
