package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/stretchr/testify/require"
)

const promSpec = `apiVersion: shoal/v1
kind: Deployment
name: mon
model: {source: /models/mon}
engine: {kind: ray-vllm, servedModelName: mon, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {min: 2, max: 2}
autoscaling: {policy: kpa, metric: num_requests_running, target: 8, stableWindowSeconds: 6, panicWindowSeconds: 2}
`

// TestPrometheusScrapesHeadsOnly runs a real Prometheus against a dev
// cluster through the coordinator's HTTP service discovery: only replica
// heads are engine targets, the targets follow a head change, and every
// PromQL expression of the Grafana dashboard returns data.
func TestPrometheusScrapesHeadsOnly(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		if os.Getenv("SHOAL_REQUIRE_PROMETHEUS") == "1" {
			t.Fatal("prometheus not installed (apt-get install prometheus)")
		}
		t.Skip("prometheus not installed (apt-get install prometheus)")
	}
	addrs := freeAddrs(t, "127.0.21.1", 2)
	metrics, promAddr := addrs[0], addrs[1]
	e := startCluster(t, 21, 5, func(c *devcluster.Config) { c.MetricsAddr, c.AgentMetrics = metrics, true })
	e.apply("mon.yaml", promSpec)

	cfg := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: shoal-engines
    http_sd_configs: [{url: "http://%[1]s/v1/sd/engines", refresh_interval: 1s}]
  - job_name: shoal-agents
    http_sd_configs: [{url: "http://%[1]s/v1/sd/agents", refresh_interval: 1s}]
  - job_name: shoal-coordinator
    static_configs: [{targets: ["%[1]s"]}]
`, metrics)
	// The shipped config differs only in addresses and intervals.
	shipped, err := os.ReadFile("../../deploy/prometheus/prometheus.yml")
	require.NoError(t, err)
	for _, s := range []string{"/v1/sd/engines", "/v1/sd/agents", "job_name: shoal-engines", "job_name: shoal-agents", "job_name: shoal-coordinator"} {
		require.Contains(t, string(shipped), s)
	}
	pdir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(pdir, "prometheus.yml"), []byte(cfg), 0o644))
	out, err := exec.Command("promtool", "check", "config", filepath.Join(pdir, "prometheus.yml")).CombinedOutput()
	require.NoError(t, err, string(out))
	cmd := exec.Command(prom, "--config.file="+filepath.Join(pdir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(pdir, "data"),
		"--web.listen-address="+promAddr)
	logf, _ := os.Create(filepath.Join(e.dir, "logs", "prometheus.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	// Traffic throughout, so rates and latency histograms have data.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithMaxRetries(0))
	go func() {
		for ctx.Err() == nil {
			_, _ = client.Completions.New(ctx, openai.CompletionNewParams{Model: "mon", MaxTokens: openai.Int(8),
				Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("a shared prefix for the cache " + time.Now().String())}})
			time.Sleep(50 * time.Millisecond)
		}
	}()

	heads := func() []string {
		var out []string
		for _, r := range e.replicas() {
			if r.State == "ready" {
				out = append(out, r.Endpoint)
			}
		}
		sort.Strings(out)
		return out
	}
	engineTargets := func() []string {
		var res struct {
			Data struct {
				ActiveTargets []struct {
					Labels     map[string]string `json:"labels"`
					ScrapePool string            `json:"scrapePool"`
					Health     string            `json:"health"`
				} `json:"activeTargets"`
			} `json:"data"`
		}
		if promGet(promAddr, "/api/v1/targets?state=active", &res) != nil {
			return nil
		}
		var out []string
		for _, tg := range res.Data.ActiveTargets {
			if tg.ScrapePool == "shoal-engines" && tg.Health == "up" && tg.Labels["role"] == "head" {
				out = append(out, tg.Labels["instance"])
			}
		}
		sort.Strings(out)
		return out
	}
	var want []string
	require.Eventually(t, func() bool {
		want = heads()
		return len(want) == 2 && fmt.Sprint(engineTargets()) == fmt.Sprint(want)
	}, 60*time.Second, 250*time.Millisecond, "engine targets %v, heads %v", engineTargets(), want)

	// A head's host dies: its replica re-forms elsewhere and the targets follow.
	victim := ""
	for _, n := range e.nodes() {
		if n.Role == "head" {
			victim = n.NodeID
			break
		}
	}
	require.NotEmpty(t, victim)
	require.NoError(t, e.c.Kill(victim))
	require.Eventually(t, func() bool {
		now := heads()
		return len(now) == 2 && fmt.Sprint(now) != fmt.Sprint(want) && fmt.Sprint(engineTargets()) == fmt.Sprint(now)
	}, 60*time.Second, 250*time.Millisecond, "targets did not follow the new head: %v vs %v", engineTargets(), heads())

	// Every expression of the dashboard returns data.
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	b, err := os.ReadFile("../../deploy/grafana/shoal.json")
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &dash))
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			n++
			expr := tg.Expr
			var got int
			ok := assertEventually(func() bool {
				var res struct {
					Status string `json:"status"`
					Data   struct {
						Result []json.RawMessage `json:"result"`
					} `json:"data"`
				}
				if err := promGet(promAddr, "/api/v1/query?query="+url.QueryEscape(expr), &res); err != nil || res.Status != "success" {
					return false
				}
				got = len(res.Data.Result)
				return got > 0
			}, 30*time.Second)
			require.True(t, ok, "panel %q: %s returned no data", p.Title, expr)
		}
	}
	require.GreaterOrEqual(t, n, 20)

	// shoal's own gauges say what `shoal get` says: 4 live agents, all in
	// the 2 ready 2-node replicas.
	value := func(expr string) string {
		var res struct {
			Data struct {
				Result []struct {
					Value []any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if promGet(promAddr, "/api/v1/query?query="+url.QueryEscape(expr), &res) != nil || len(res.Data.Result) != 1 || len(res.Data.Result[0].Value) != 2 {
			return ""
		}
		v, _ := res.Data.Result[0].Value[1].(string)
		return v
	}
	require.Eventually(t, func() bool {
		return value(`sum(shoal_nodes{state="assigned"})`) == "4" && value(`sum(shoal_replicas{state="ready"})`) == "2" &&
			value(`sum(shoal_nodes{state="idle"})`) == "0"
	}, 20*time.Second, 250*time.Millisecond, "assigned %s, ready %s", value(`sum(shoal_nodes{state="assigned"})`), value(`sum(shoal_replicas{state="ready"})`))
	// Once the dead head's series went stale, exactly the two heads are up.
	var out2 []byte
	require.True(t, assertEventually(func() bool {
		out2, err = exec.Command("promtool", "query", "instant", "http://"+promAddr, `count(up{job="shoal-engines"})`).CombinedOutput()
		return err == nil && strings.Contains(string(out2), "=> 2")
	}, 20*time.Second), "engine targets per promtool: %s", out2)
}

func promGet(addr, path string, v any) error {
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}
