package e2e

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/stretchr/testify/require"
)

// TestStandaloneRouterOutlivesCoordinator: `shoal router` joins the gossip,
// finds the head itself, enforces API keys, serves chat (and the engine's errors) to the
// official client, and keeps routing after the coordinator is SIGKILLed.
func TestStandaloneRouterOutlivesCoordinator(t *testing.T) {
	e := startCluster(t, 10, 2)
	e.apply("one.yaml", strings.Replace(spec2x2, "count: 2", "count: 1", 1))

	// Keys are made by the CLI and stored hashed; one is rate limited.
	keys := filepath.Join(e.dir, "keys.yaml")
	newKey := func(args ...string) string {
		out, err := exec.Command(filepath.Join(binDir, "shoal"), append([]string{"apikey", "create", "--file", keys}, args...)...).Output()
		require.NoError(t, err)
		return strings.TrimSpace(string(out))
	}
	demoKey := newKey("--name", "team-demo", "--models", "demo")
	otherKey := newKey("--name", "team-other", "--models", "other")
	slowKey := newKey("--name", "slow", "--models", "*", "--rps", "0.2", "--burst", "1")
	stored, err := os.ReadFile(keys)
	require.NoError(t, err)
	require.NotContains(t, string(stored), demoKey, "keys are stored hashed")
	require.Contains(t, string(stored), router.HashKey(demoKey))
	listen := e.startRouter("127.0.10.1", "--api-keys-file", keys)

	client := openai.NewClient(option.WithBaseURL("http://"+listen+"/v1/"), option.WithAPIKey(demoKey), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	params := openai.ChatCompletionNewParams{Model: "demo", MaxTokens: openai.Int(4),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}}
	require.Eventually(t, func() bool { _, err := client.Chat.Completions.New(ctx, params); return err == nil }, 60*time.Second, 200*time.Millisecond)

	// A generative model serves no embeddings: the engine's own 400 comes
	// through (a pooling deployment serves them: TestPoolingModelBecomesReady).
	var apiErr *openai.Error
	_, err = client.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "demo",
		Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"a", "b"}}})
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, 400, apiErr.StatusCode)
	require.Contains(t, apiErr.Message, "does not support Embeddings API")

	upstream := func() float64 {
		return metricSum(t, "http://"+listen+"/metrics", "shoal_router_upstream_first_byte_seconds_count")
	}
	before := upstream()
	bad := openai.NewClient(option.WithBaseURL("http://"+listen+"/v1/"), option.WithAPIKey("sk-wrong-9999"), option.WithMaxRetries(0))
	for i := 0; i < 3; i++ {
		_, err = bad.Chat.Completions.New(ctx, params)
		require.True(t, errors.As(err, &apiErr))
		require.Equal(t, 401, apiErr.StatusCode)
	}
	require.Equal(t, before, upstream(), "a bad key never reaches an engine")
	slow := openai.NewClient(option.WithBaseURL("http://"+listen+"/v1/"), option.WithAPIKey(slowKey), option.WithMaxRetries(0))
	_, err = slow.Chat.Completions.New(ctx, params)
	require.NoError(t, err, "the first request fits the burst")
	_, err = slow.Chat.Completions.New(ctx, params)
	require.True(t, errors.As(err, &apiErr))
	require.Equal(t, 429, apiErr.StatusCode, "over the key's rate")
	require.Equal(t, "rate_limit_exceeded", apiErr.Code)
	require.NotEmpty(t, apiErr.Response.Header.Get("Retry-After"))
	other := openai.NewClient(option.WithBaseURL("http://"+listen+"/v1/"), option.WithAPIKey(otherKey), option.WithMaxRetries(0))
	_, err = other.Chat.Completions.New(ctx, params)
	require.True(t, errors.As(err, &apiErr))
	require.Equal(t, 404, apiErr.StatusCode, "a key without access to the model")
	_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "nope", Messages: params.Messages})
	require.True(t, errors.As(err, &apiErr))
	require.Equal(t, 404, apiErr.StatusCode)

	// The coordinator dies; the standalone router and the replica keep serving.
	e.c.KillCoordinator()
	deadline := time.Now().Add(4 * time.Second)
	n := 0
	for time.Now().Before(deadline) {
		r, err := client.Chat.Completions.New(ctx, params)
		require.NoError(t, err, "routing must not depend on the coordinator")
		require.Len(t, r.Choices, 1)
		n++
		time.Sleep(50 * time.Millisecond)
	}
	require.GreaterOrEqual(t, n, 3, "requests kept succeeding for 4 s after the coordinator died (every one succeeded)")
	resp, err := http.Get("http://" + listen + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode)
}

// startRouter runs `shoal router` joined to the cluster on ip and returns its
// OpenAI address.
func (e *env) startRouter(ip string, args ...string) string {
	e.t.Helper()
	addrs := freeAddrs(e.t, ip, 2)
	listen, gport := addrs[0], addrs[1]
	_, gp, _ := strings.Cut(gport, ":")
	sec, err := e.c.RouterArgs("router-" + ip)
	require.NoError(e.t, err)
	if !slices.Contains(args, "--api-keys-file") {
		args = append(args, "--no-api-keys") // a test router without keys says so
	}
	cmd := exec.Command(filepath.Join(binDir, "shoal"), append(append([]string{"router", "--address", ip, "--gossip-port", gp,
		"--join", e.gossip, "--listen", listen, "--gossip-profile", "fast", "--node-id", "router-" + ip}, sec...), args...)...)
	logf, err := os.Create(filepath.Join(e.dir, "logs", "router-"+ip+".log"))
	require.NoError(e.t, err)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(e.t, cmd.Start())
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logf.Close() })
	return listen
}

// TestStandaloneRouterScalesFromZero: a request through a standalone router
// for a deployment at zero replicas is held; the router tells the coordinator
// (found in the gossip), a replica forms, and the held request is served.
func TestStandaloneRouterScalesFromZero(t *testing.T) {
	e := startCluster(t, 18, 2)
	e.apply("zero.yaml", zeroSpec)
	listen := e.startRouter("127.0.18.1")
	require.Equal(t, 0, e.count("zero", ""))
	hc := &http.Client{Timeout: 60 * time.Second}
	var resp *http.Response
	start := time.Now()
	require.Eventually(t, func() bool { // until the router has seen the model in the gossip…
		r, err := hc.Post("http://"+listen+"/v1/completions", "application/json", strings.NewReader(`{"model":"zero","prompt":"x","max_tokens":2}`))
		if err != nil {
			return false
		}
		r.Body.Close()
		resp = r
		return r.StatusCode != 404
	}, 30*time.Second, 200*time.Millisecond)
	require.Equal(t, 200, resp.StatusCode, "the held request is served")
	t.Logf("AUTOSCALE: scale from zero through a standalone router served after %.2fs", time.Since(start).Seconds())
}

// metricSum adds up every sample of a metric on a /metrics page.
func metricSum(t *testing.T, url, name string) float64 {
	t.Helper()
	v, _, err := scrapeSum(url, name)
	require.NoError(t, err)
	return v
}
