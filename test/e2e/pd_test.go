package e2e

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
