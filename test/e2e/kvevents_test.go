package e2e

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const kvSpec = `apiVersion: shoal/v1
kind: Deployment
name: kv
model: {source: /models/kv}
engine: {kind: vllm, servedModelName: kv, tensorParallelSize: 1, startupTimeoutSeconds: 60}
resources: {nodes: 1, gpusPerNode: 1}
replicas: {count: 3}
`

// TestKVEventRoutingAcrossRouters: three replicas whose engines publish KV
// events, two standalone routers. What one router sends somewhere, the
// other — which never saw that prompt — sends to the same replica, because
// both read where the blocks are from the engines, through the heads.
func TestKVEventRoutingAcrossRouters(t *testing.T) {
	kvRoutingAcrossRouters(t, 31, kvSpec)
}

// TestSGLangKVEventRoutingAcrossRouters: the same with SGLang engines,
// whose pages are named by SGLang's own chain (no seed) and published in
// its encoding, one event per page.
func TestSGLangKVEventRoutingAcrossRouters(t *testing.T) {
	kvRoutingAcrossRouters(t, 40, strings.Replace(kvSpec, "kind: vllm", "kind: sglang", 1))
}

func kvRoutingAcrossRouters(t *testing.T, subnet int, doc string) {
	e := startCluster(t, subnet, 3)
	e.apply("kv.yaml", doc)
	require.Eventually(t, func() bool { return e.count("kv", "ready") == 3 }, 90*time.Second, 200*time.Millisecond)
	r1, r2 := e.startRouter(fmt.Sprintf("127.0.%d.1", subnet)), e.startRouter(fmt.Sprintf("127.0.%d.9", subnet))
	for _, r := range []string{r1, r2} {
		require.Eventually(t, func() bool {
			v, ok := tryMetric("http://"+r+"/metrics", "shoal_router_kv_index_replicas")
			return ok && v == 3
		},
			60*time.Second, 200*time.Millisecond, "router %s follows every replica's KV events", r)
	}
	send := func(router, prompt string) string {
		body := fmt.Sprintf(`{"model":"kv","prompt":%q,"max_tokens":2}`, prompt)
		var replica string
		require.Eventually(t, func() bool {
			req, _ := http.NewRequest("POST", "http://"+router+"/v1/completions", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("routing-strategy", "prefix-cache")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return false
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			replica = resp.Header.Get("X-Shoal-Replica")
			return resp.StatusCode == 200
		}, 30*time.Second, 100*time.Millisecond)
		return replica
	}
	seen := map[string]bool{}
	for i := 0; i < 6; i++ {
		prefix := strings.Repeat(fmt.Sprintf("Tenant %d: these are the standing instructions. ", i), 60)
		before := metricSum(t, "http://"+r2+"/metrics", "shoal_router_kv_index_blocks")
		first := send(r1, prefix+"First question?")
		seen[first] = true
		require.Eventually(t, func() bool { return metricSum(t, "http://"+r2+"/metrics", "shoal_router_kv_index_blocks") > before },
			10*time.Second, 20*time.Millisecond, "the second router hears of the blocks from the engine")
		require.Equal(t, first, send(r2, prefix+"Second question?"), "prefix %d: the router that never saw it goes where its blocks are", i)
	}
	t.Logf("KV EVENTS: 6 prefixes over %d replicas, each followed by the other router", len(seen))
	require.Zero(t, metricSum(t, "http://"+r2+"/metrics", "shoal_router_tokenize_failures_total"))

	// A burst of 12 prompts cached nowhere, 2,500 tokens each, at once: two
	// per replica fill its prefill queue past --hold-prefill-tokens (4,096),
	// so the rest wait at the router for a first token, and every one is
	// answered.
	// The other router sees the burst's queue through the heads (their
	// Queue streams), though it sends none of it.
	burstDone, sawOthers := make(chan struct{}), make(chan float64, 1)
	go func() {
		most := 0.0
		defer func() { sawOthers <- most }()
		for {
			if v, ok := tryMetric("http://"+r2+"/metrics", `shoal_router_queued_prefill_tokens{router="others"}`); ok {
				most = max(most, v)
			}
			select {
			case <-burstDone:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	codes := make(chan int, 12)
	for i := 0; i < 12; i++ {
		go func() {
			body := fmt.Sprintf(`{"model":"kv","prompt":%q,"max_tokens":2}`, strings.Repeat(fmt.Sprintf("burst %02d ", i), 1200)[:10_000])
			req, _ := http.NewRequest("POST", "http://"+r1+"/v1/completions", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("routing-strategy", "prefix-cache")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				codes <- 0
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			codes <- resp.StatusCode
		}()
	}
	for i := 0; i < 12; i++ {
		require.Equal(t, 200, <-codes, "a burst request")
	}
	took := time.Since(start)
	close(burstDone)
	others := <-sawOthers
	require.Positive(t, others, "the second router saw the first one's queue (the burst took %v)", took)
	require.Eventually(t, func() bool {
		v, ok := tryMetric("http://"+r2+"/metrics", `shoal_router_queued_prefill_tokens{router="others"}`)
		return ok && v == 0
	}, 10*time.Second, 20*time.Millisecond, "and saw it empty after")
	waited := metricSum(t, "http://"+r1+"/metrics", `shoal_router_wait_seconds_count`)
	require.Positive(t, waited, "some of the burst waited at the router")
	require.Zero(t, metricSum(t, "http://"+r1+"/metrics", "shoal_router_waiting_requests"))
	t.Logf("KV EVENTS: a burst of 12 uncached 2,500-token prompts over 3 replicas in %v: %.0f waited at the router; the other router saw up to %.0f tokens of it queued", took, waited, others)
}

// tryMetric is metricSum for a page that may not be up yet: ok is false
// until it answers with the metric.
func tryMetric(url, name string) (float64, bool) {
	v, found, err := scrapeSum(url, name)
	return v, err == nil && found
}

// scrapeSum adds up every sample of a metric on a /metrics page, and says
// whether there was one.
func scrapeSum(url, name string) (float64, bool, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != 200 {
		err = fmt.Errorf("%s answered %d", url, resp.StatusCode)
	}
	if err != nil {
		return 0, false, err
	}
	var sum float64
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, name+" ") || strings.HasPrefix(line, name+"{") {
			f := strings.Fields(line)
			var v float64
			fmt.Sscan(f[len(f)-1], &v)
			sum += v
			found = true
		}
	}
	return sum, found, nil
}
