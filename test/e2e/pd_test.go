package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/devcluster"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"
)

// startEngine runs shoal-sim as `vllm serve` on ip:port with env, until the
// test ends.
func startEngine(t *testing.T, dir, name string, env []string, args ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "shoal-sim"), append([]string{"vllm", "serve"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	logf, err := os.Create(filepath.Join(dir, name+".log"))
	require.NoError(t, err)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logf.Close() })
}

func waitUp(t *testing.T, base string) {
	t.Helper()
	require.Eventually(t, func() bool {
		r, err := http.Get(base + "/health")
		if err == nil {
			r.Body.Close()
		}
		return err == nil && r.StatusCode == 200
	}, 30*time.Second, 50*time.Millisecond)
}

// TestStaticPrefillDecode: vLLM engines with the NixlConnector (simulated)
// on two hosts, one to prefill and one to decode, behind `shoal router
// --backend prefill:… --backend decode:…`; openai-go's chat and
// completions, streamed and not, are prefilled on one and decoded on the
// other: the decode engine's log shows the pulled prompt, and its
// side-channel host must be the prefill host's own address (the default,
// localhost, would not reach across hosts).
func TestStaticPrefillDecode(t *testing.T) {
	dir := t.TempDir()
	pa, da, ra := freeAddrs(t, "127.0.33.2", 1)[0], freeAddrs(t, "127.0.33.3", 1)[0], freeAddrs(t, "127.0.33.1", 1)[0]
	kv := `{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"fail"}`
	for _, e := range []struct{ name, addr string }{{"prefill", pa}, {"decode", da}} {
		host, port, _ := strings.Cut(e.addr, ":")
		startEngine(t, dir, e.name, []string{"SHOAL_SIM_LOAD_SECONDS=0.2", "VLLM_NIXL_SIDE_CHANNEL_HOST=" + host, "SHOAL_SIM_NIXL_HANDSHAKE_SECONDS=0.5"},
			"/models/m", "--served-model-name", "m", "--host", host, "--port", port, "--kv-transfer-config", kv)
	}
	waitUp(t, "http://"+pa)
	waitUp(t, "http://"+da)
	cmd := exec.Command(filepath.Join(binDir, "shoal"), "router", "--listen", ra, "--no-api-keys",
		"--backend", "prefill:m="+pa, "--backend", "decode:m="+da)
	logf, err := os.Create(filepath.Join(dir, "router.log"))
	require.NoError(t, err)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logf.Close() })
	require.Eventually(t, func() bool {
		r, err := http.Get("http://" + ra + "/v1/models")
		if err == nil {
			r.Body.Close()
		}
		return err == nil && r.StatusCode == 200
	}, 10*time.Second, 50*time.Millisecond)

	rl, err := os.ReadFile(filepath.Join(dir, "router.log"))
	require.NoError(t, err)
	require.Contains(t, string(rl), "prefill/decode pairs warmed", "the router warmed the pair before it listened")
	require.Contains(t, string(rl), "pairs=1 failed=0")

	client := openai.NewClient(option.WithBaseURL("http://"+ra+"/v1/"), option.WithAPIKey("none"), option.WithMaxRetries(0))
	ctx := context.Background()
	prompt := strings.Repeat("Tell me about prefill and decode engines. ", 12)
	chat, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "m",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(prompt)}, MaxTokens: openai.Int(8)})
	require.NoError(t, err)
	require.NotEmpty(t, chat.Choices[0].Message.Content)
	st := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{Model: "m",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(prompt + " again")}, MaxTokens: openai.Int(8)})
	var text strings.Builder
	for st.Next() {
		if ch := st.Current(); len(ch.Choices) > 0 {
			text.WriteString(ch.Choices[0].Delta.Content)
		}
	}
	require.NoError(t, st.Err())
	require.NotEmpty(t, text.String())
	comp, err := client.Completions.New(ctx, openai.CompletionNewParams{Model: "m",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt + " once more")}, MaxTokens: openai.Int(4)})
	require.NoError(t, err)
	require.Equal(t, int64(4), comp.Usage.CompletionTokens, "decoded in full on the decode engine")

	m := engineMetrics(t, da)
	require.Positive(t, m.PrefixHits, "the decode engine found every prompt's KV, pulled from the prefill engine")
	pm := engineMetrics(t, pa)
	require.Equal(t, 4.0, pm.GenerationTokens, "the prefill engine made one token per request (the warm-up's and three)")
	require.Equal(t, 21.0, m.GenerationTokens, "the decode engine made every answer's tokens: the warm-up's 1, then 8 + 8 + 4")
}

// pdSpec is one side of a disaggregated model pd on one 8-GPU node.
func pdSpec(name, role string, replicas int, extra string) string {
	return fmt.Sprintf(`apiVersion: shoal/v1
name: %s
model: {source: /models/pd}
engine: {kind: vllm, servedModelName: pd, tensorParallelSize: 8, startupTimeoutSeconds: 60,
  kvTransfer: {connector: nixl, role: %s}%s}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {count: %d}
`, name, role, extra, replicas)
}

// TestDisaggregatedDeployments: a prefill deployment and a decode
// deployment of one served model (2 decode replicas) serve openai-go's
// chat and completions through the coordinator's router: each prompt is
// prefilled on the prefill engine and decoded on a decode engine that
// pulled its KV. A decode deployment the prefill one cannot pair with is
// refused at apply, naming the fields. Then the prefill engine is killed
// under load: no request fails (those that had not reached decode are
// served whole by a decode engine, the others retried).
func TestDisaggregatedDeployments(t *testing.T) {
	e := startCluster(t, 34, 5, func(c *devcluster.Config) { c.SimEnv = append(c.SimEnv, "SHOAL_SIM_NIXL_HANDSHAKE_SECONDS=0.5") })
	e.apply("prefill.yaml", pdSpec("pd-prefill", "prefill", 1, ""))
	e.apply("decode.yaml", pdSpec("pd-decode", "decode", 2, ""))
	require.Eventually(t, func() bool { return e.count("pd-prefill", "ready") == 1 && e.count("pd-decode", "ready") == 2 }, 90*time.Second, 200*time.Millisecond)

	f := filepath.Join(e.dir, "bad.yaml")
	require.NoError(t, os.WriteFile(f, []byte(pdSpec("pd-bad", "decode", 1, ", args: [--max-model-len, '4096']")), 0o644))
	out, err := e.shoal("apply", "-f", f)
	require.Error(t, err)
	require.Contains(t, out, "engine.args --max-model-len: prefill (default) and decode 4096 differ")

	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithAPIKey("none"), option.WithMaxRetries(0))
	ctx := context.Background()
	prompt := strings.Repeat("A question about disaggregated serving. ", 12)
	servePD(t, client, "pd", prompt, 6)
	// A standalone router joined to the gossip serves the same model the
	// same way (its own warm-ups first).
	sa := e.startRouter("127.0.34.1")
	require.Eventually(t, func() bool {
		r, err := http.Get("http://" + sa + "/v1/models")
		if err != nil {
			return false
		}
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return strings.Contains(string(b), `"pd"`)
	}, 30*time.Second, 100*time.Millisecond)
	servePD(t, openai.NewClient(option.WithBaseURL("http://"+sa+"/v1/"), option.WithAPIKey("none"), option.WithMaxRetries(0)), "pd", "standalone "+prompt, 1)

	pre := e.replicasOf("pd-prefill")[0]
	pm := engineMetrics(t, pre.Endpoint)
	// One token per request (8 through the coordinator's router, 3 through
	// the standalone one), the readiness canary's and each router's pair
	// warm-ups' (one per decode replica).
	require.GreaterOrEqual(t, pm.GenerationTokens, 11.0, "the prefill engine made one token for each of the 11 requests")
	require.LessOrEqual(t, pm.GenerationTokens, 17.0, "and nothing more: the decode engines generate the answers")
	hits := 0.0
	for _, r := range e.replicasOf("pd-decode") {
		hits += engineMetrics(t, r.Endpoint).PrefixHits
	}
	require.Greater(t, hits, 11*60.0, "the decode engines found every prompt's KV, pulled from the prefill engine")

	// The prefill engine dies under load.
	require.Zero(t, killUnderLoad(t, e, client, "pd", prompt, pre.Head), "no request fails when the prefill engine dies")
	// The prefill group restarts and prefills again.
	require.Eventually(t, func() bool { return e.count("pd-prefill", "ready") == 1 }, 60*time.Second, 200*time.Millisecond)

	// Under steady load: a second prefill and a third decode replica join
	// (each held out of the router until its pairs are warmed), then the
	// prefill deployment scales back in to one: the leaving group takes no
	// new prefills and stops only once the decode engines have read all
	// the KV it held. No request fails, and no decode engine's transfer.
	warmed := func() float64 {
		v, _ := tryMetric("http://"+e.router+"/metrics", "shoal_router_pair_warmups_total")
		return v
	}
	failedXfers := func() float64 {
		n := 0.0
		for _, r := range e.replicasOf("pd-decode") {
			v, _ := tryMetric("http://"+r.Endpoint+"/metrics", "vllm:nixl_num_failed_transfers_total")
			n += v
		}
		return n
	}
	stop := make(chan struct{})
	var sent, lost sync.Map
	var lwg sync.WaitGroup
	for w := 0; w < 6; w++ {
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				_, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "pd",
					Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(fmt.Sprintf("steady %d %d %s", w, i, prompt))}, MaxTokens: openai.Int(8)})
				sent.Store(fmt.Sprint(w, i), true)
				if err != nil {
					lost.Store(fmt.Sprint(w, i), err)
				}
			}
		}()
	}
	w0 := warmed()
	e.apply("prefill.yaml", pdSpec("pd-prefill", "prefill", 2, ""))
	e.apply("decode.yaml", pdSpec("pd-decode", "decode", 3, ""))
	require.Eventually(t, func() bool { return e.count("pd-prefill", "ready") == 2 && e.count("pd-decode", "ready") == 3 }, 90*time.Second, 200*time.Millisecond)
	// 2 × 3 pairs: the new prefill's 3, the new decode's other 1 (and
	// the pair of the two new ones): at least 4 warmed before they served.
	require.Eventually(t, func() bool { return warmed()-w0 >= 4 }, 30*time.Second, 100*time.Millisecond, "new endpoints' pairs warmed")
	time.Sleep(time.Second) // both new groups take traffic
	x0 := failedXfers()
	e.apply("prefill.yaml", pdSpec("pd-prefill", "prefill", 1, ""))
	require.Eventually(t, func() bool { return len(e.replicasOf("pd-prefill")) == 1 }, 90*time.Second, 200*time.Millisecond)
	time.Sleep(time.Second)
	close(stop)
	lwg.Wait()
	n, failedN := 0, 0
	sent.Range(func(any, any) bool { n++; return true })
	lost.Range(func(k, v any) bool { failedN++; t.Logf("PD scale: failed request %v: %v", k, v); return true })
	require.Zero(t, failedN, "no request fails across prefill scale-out, decode scale-out and prefill scale-in")
	require.Equal(t, x0, failedXfers(), "no decode engine failed to read KV from the leaving prefill group")
	out, err = e.shoal("describe", "deployment", "pd-prefill")
	require.NoError(t, err)
	require.Contains(t, out, "SuccessfulRescale: released replica")
	t.Logf("PD: %d requests under load across prefill 1→2, decode 2→3, prefill 2→1: 0 failed; %.0f pairs warmed", n, warmed()-w0)
}

// sglangPDSpec is one side of an SGLang-disaggregated model spd on one
// 8-GPU node.
func sglangPDSpec(name, role string, replicas int) string {
	return fmt.Sprintf(`apiVersion: shoal/v1
name: %s
model: {source: /models/spd}
engine: {kind: sglang, servedModelName: spd, tensorParallelSize: 8, startupTimeoutSeconds: 60,
  kvTransfer: {connector: mooncake, role: %s}}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {count: %d}
`, name, role, replicas)
}

// TestSGLangDisaggregated: SGLang prefill and decode deployments of one
// served model (2 + 2 replicas) serve openai-go's chat, streamed and not,
// and completions through the coordinator's router with SGLang's protocol
// (the same body with bootstrap host, port and room to both engines at
// once); every prompt's KV reaches a decode engine. Then a prefill engine
// is killed under load: no request fails (the other prefill engine takes
// them, the decode engine is not blamed).
func TestSGLangDisaggregated(t *testing.T) {
	e := startCluster(t, 35, 4)
	e.apply("prefill.yaml", sglangPDSpec("spd-prefill", "prefill", 2))
	e.apply("decode.yaml", sglangPDSpec("spd-decode", "decode", 2))
	require.Eventually(t, func() bool { return e.count("spd-prefill", "ready") == 2 && e.count("spd-decode", "ready") == 2 }, 90*time.Second, 200*time.Millisecond)

	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithAPIKey("none"), option.WithMaxRetries(0))
	prompt := strings.Repeat("A question about SGLang's disaggregated serving. ", 12)
	servePD(t, client, "spd", prompt, 4)
	// 6 requests of ~70 prompt tokens (SGLang names no prefix-cache
	// counter: the prompt tokens each side computed tell it).
	var gen, pPrompt, dPrompt float64
	for _, r := range e.replicasOf("spd-prefill") {
		m := engineMetrics(t, r.Endpoint)
		gen, pPrompt = gen+m.GenerationTokens, pPrompt+m.PromptTokens
	}
	for _, r := range e.replicasOf("spd-decode") {
		dPrompt += engineMetrics(t, r.Endpoint).PromptTokens
	}
	t.Logf("SGLang PD: prefill engines computed %.0f prompt tokens and made %.0f; decode engines computed %.0f prompt tokens", pPrompt, gen, dPrompt)
	require.LessOrEqual(t, gen, 16.0, "the prefill engines made one token per request (6, their canaries' and the 4 pair warm-ups'): the decode engines made the answers")
	require.Greater(t, pPrompt, 6*60.0, "the prefill engines computed the prompts")
	require.Less(t, dPrompt, 6*20.0+40, "the decode engines computed only what the handed-over KV lacked (and the canaries' and warm-ups' prompts)")

	require.Zero(t, killUnderLoad(t, e, client, "spd", prompt, e.replicasOf("spd-prefill")[0].Head), "no request fails when a prefill engine dies")
}

// rolesSpec is one deployment "rr" with a prefill and a decode role.
const rolesSpec = `apiVersion: shoal/v1
name: rr
model: {source: /models/rr}
engine: {kind: vllm, tensorParallelSize: 8, startupTimeoutSeconds: 60, kvTransfer: {connector: nixl}}
resources: {nodes: 1, gpusPerNode: 8}
roles:
  prefill:
    replicas: {min: 1, max: 3}
    autoscaling: {policy: kpa, metric: num_requests_waiting, target: 50}
  decode:
    replicas: {count: 2}
  ratio: {min: 1, max: 1.5}
`

// TestDeploymentRoles: one deployment declares a prefill and a decode role;
// each runs as its own replica groups (rr-prefill, rr-decode) and the model
// is served disaggregated through the built-in router. The prefill role
// autoscales, bounded by roles.ratio to at least one prefill replica per
// decode replica: 2, though its autoscaler alone would keep 1. `describe`
// shows each role; a role cannot be deleted on its own.
func TestDeploymentRoles(t *testing.T) {
	e := startCluster(t, 36, 4, func(c *devcluster.Config) { c.SimEnv = append(c.SimEnv, "SHOAL_SIM_NIXL_HANDSHAKE_SECONDS=0.2") })
	e.apply("rr.yaml", rolesSpec)
	require.Eventually(t, func() bool { return e.count("rr-prefill", "ready") == 2 && e.count("rr-decode", "ready") == 2 }, 90*time.Second, 200*time.Millisecond)
	require.Len(t, e.replicasOf("rr"), 4, "`get replicas rr` lists both roles' groups")

	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithAPIKey("none"), option.WithMaxRetries(0))
	ctx := context.Background()
	prompt := strings.Repeat("A question for a deployment with roles. ", 12)
	for i := 0; i < 4; i++ {
		chat, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "rr",
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(fmt.Sprintf("%d %s", i, prompt))}, MaxTokens: openai.Int(6)})
		require.NoError(t, err)
		require.NotEmpty(t, chat.Choices[0].Message.Content)
	}
	hits := 0.0
	for _, r := range e.replicasOf("rr-decode") {
		hits += engineMetrics(t, r.Endpoint).PrefixHits
	}
	require.Greater(t, hits, 4*60.0, "the decode role decoded from KV the prefill role computed")

	out, err := e.shoal("describe", "deployment", "rr")
	require.NoError(t, err, out)
	for _, want := range []string{"prefill (rr-prefill): 2/2 ready", "decode (rr-decode): 2/2 ready", "kpa on num_requests_waiting",
		"bounded to 1–1.5 prefill replicas per decode replica", "roles.ratio 1–1.5: prefill replicas 2 (the autoscaler's 1) for 2 decode replica(s)"} {
		require.Contains(t, out, want)
	}
	out, err = e.shoal("delete", "deployment", "rr-prefill")
	require.Error(t, err)
	require.Contains(t, out, "is the prefill role of deployment rr")
	out, err = e.shoal("delete", "deployment", "rr")
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return len(e.replicasOf("rr-prefill"))+len(e.replicasOf("rr-decode")) == 0 }, 60*time.Second, 200*time.Millisecond,
		"deleting the deployment releases both roles' groups")
}

// servePD sends openai-go's chat (chats of them, then one streamed) and a
// completion for model through client, and checks each answer.
func servePD(t *testing.T, client openai.Client, model, prompt string, chats int) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < chats; i++ {
		chat, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: model,
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(fmt.Sprintf("%d %s", i, prompt))}, MaxTokens: openai.Int(6)})
		require.NoError(t, err)
		require.NotEmpty(t, chat.Choices[0].Message.Content)
	}
	st := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{Model: model,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("streamed " + prompt)}, MaxTokens: openai.Int(6)})
	n := 0
	for st.Next() {
		n++
	}
	require.NoError(t, st.Err())
	require.Positive(t, n)
	comp, err := client.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(model),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("completion " + prompt)}, MaxTokens: openai.Int(4)})
	require.NoError(t, err)
	require.Equal(t, int64(4), comp.Usage.CompletionTokens)
}

// killUnderLoad runs 8 clients of 8 chat requests each for model and
// SIGKILLs node's engine 300 ms in; it returns how many requests failed.
func killUnderLoad(t *testing.T, e *env, client openai.Client, model, prompt, node string) int {
	t.Helper()
	results := make(chan error, 64)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 8; i++ {
				_, err := client.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: model,
					Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(fmt.Sprintf("load %d %d %s", w, i, prompt))}, MaxTokens: openai.Int(8)})
				results <- err
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	pids := e.c.EnginePids(node)
	require.NotEmpty(t, pids)
	require.NoError(t, syscall.Kill(pids[0], syscall.SIGKILL))
	wg.Wait()
	close(results)
	failed := 0
	for err := range results {
		if err != nil {
			failed++
			t.Logf("%s: failed request: %v", model, err)
		}
	}
	return failed
}
