package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"
	"github.com/openai/openai-go/v3/shared"
	"github.com/stretchr/testify/require"
)

// sdkSpecs are what the SDK suites call: a generative deployment started
// as vLLM must be for tool calls, and a pooling one for embeddings.
const sdkSpecs = `apiVersion: shoal/v1
name: demo
model: {source: /models/demo}
engine: {kind: ray-vllm, servedModelName: demo, args: [--enable-auto-tool-choice, --tool-call-parser, hermes], startupTimeoutSeconds: 30}
resources: {nodes: 1, gpusPerNode: 8}
`

const sdkEmbedSpec = `apiVersion: shoal/v1
name: embed
model: {source: /models/bge-m3}
engine: {kind: ray-vllm, servedModelName: bge, args: [--runner, pooling], startupTimeoutSeconds: 30}
resources: {nodes: 1, gpusPerNode: 8}
`

// TestOfficialSDKs runs the official OpenAI Node SDK (npm openai, pinned in
// test/sdk/node/package-lock.json; `npm ci --prefix test/sdk/node`) and
// openai-go against a cluster through a standalone router with API keys:
// models, chat, completions and responses streamed and not, n, logprobs,
// tools, structured output, embeddings on a pooling deployment, errors and
// their types, retries with Retry-After, abort.
func TestOfficialSDKs(t *testing.T) {
	suite := filepath.Join("..", "sdk", "node")
	if _, err := os.Stat(filepath.Join(suite, "node_modules", "openai")); err != nil {
		t.Fatalf("the Node SDK is not installed: run `npm ci --prefix test/sdk/node` (.ci/run does): %v", err)
	}
	node, err := exec.LookPath("node")
	require.NoError(t, err, "node is needed for the Node SDK suite (apt-get install nodejs)")

	e := startCluster(t, 29, 2)
	e.apply("demo.yaml", sdkSpecs)
	e.apply("embed.yaml", sdkEmbedSpec)
	keys := filepath.Join(e.dir, "keys.yaml")
	newKey := func(args ...string) string {
		out, err := exec.Command(filepath.Join(binDir, "shoal"), append([]string{"apikey", "create", "--file", keys}, args...)...).Output()
		require.NoError(t, err)
		return strings.TrimSpace(string(out))
	}
	key := newKey("--name", "all", "--models", "*")
	slow := newKey("--name", "slow", "--models", "*", "--rps", "1", "--burst", "1")
	listen := e.startRouter("127.0.29.1", "--api-keys-file", keys)
	base := "http://" + listen + "/v1"

	client := openai.NewClient(option.WithBaseURL(base+"/"), option.WithAPIKey(key), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	hi := []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}
	require.Eventually(t, func() bool {
		_, err1 := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "demo", MaxTokens: openai.Int(1), Messages: hi})
		_, err2 := client.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "bge", Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("x")}})
		return err1 == nil && err2 == nil
	}, 90*time.Second, 250*time.Millisecond, "both deployments serve through the router")

	t.Run("node", func(t *testing.T) {
		cmd := exec.CommandContext(ctx, node, "suite.mjs")
		cmd.Dir = suite
		cmd.Env = append(os.Environ(), "SHOAL_BASE_URL="+base, "SHOAL_KEY="+key, "SHOAL_SLOW_KEY="+slow, "SHOAL_MODEL=demo", "SHOAL_EMBED_MODEL=bge")
		out, err := cmd.CombinedOutput()
		t.Logf("node SDK suite:\n%s", out)
		require.NoError(t, err, "a check of the Node SDK suite failed")
		require.Contains(t, string(out), "18/18 passed")
	})

	t.Run("go", func(t *testing.T) {
		m, err := client.Models.Get(ctx, "demo")
		require.NoError(t, err)
		var card struct {
			MaxModelLen int    `json:"max_model_len"`
			OwnedBy     string `json:"owned_by"`
		}
		require.NoError(t, json.Unmarshal([]byte(m.RawJSON()), &card))
		require.Positive(t, card.MaxModelLen)
		require.Equal(t, "vllm", card.OwnedBy)

		c, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "demo", MaxTokens: openai.Int(3), Messages: hi,
			N: openai.Int(2), Logprobs: openai.Bool(true), TopLogprobs: openai.Int(2)})
		require.NoError(t, err)
		require.Len(t, c.Choices, 2)
		require.NotEmpty(t, c.Choices[0].Logprobs.Content)
		require.Len(t, c.Choices[0].Logprobs.Content[0].TopLogprobs, 2)

		tool := openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{Name: "get_weather",
			Parameters: shared.FunctionParameters{"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string"}}, "required": []string{"city"}}})
		tc, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "demo", Messages: hi, Tools: []openai.ChatCompletionToolUnionParam{tool}})
		require.NoError(t, err)
		require.Equal(t, "tool_calls", tc.Choices[0].FinishReason)
		require.Equal(t, "get_weather", tc.Choices[0].Message.ToolCalls[0].Function.Name)

		so, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "demo", Messages: hi,
			ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
				JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "p", Schema: map[string]any{"type": "object",
					"properties": map[string]any{"n": map[string]any{"type": "integer"}}, "required": []string{"n"}}}}}})
		require.NoError(t, err)
		var v struct {
			N *int `json:"n"`
		}
		require.NoError(t, json.Unmarshal([]byte(so.Choices[0].Message.Content), &v))
		require.NotNil(t, v.N)

		r, err := client.Responses.New(ctx, responses.ResponseNewParams{Model: "demo", MaxOutputTokens: openai.Int(6), Store: openai.Bool(false),
			Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("hello")}})
		require.NoError(t, err)
		require.NotEmpty(t, r.OutputText())

		emb, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "bge", Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"a", "b"}}})
		require.NoError(t, err)
		require.Len(t, emb.Data, 2)

		var apiErr *openai.Error
		_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "demo", MaxTokens: openai.Int(0), Messages: hi})
		require.ErrorAs(t, err, &apiErr)
		require.Equal(t, 400, apiErr.StatusCode)
		require.Contains(t, apiErr.Message, "max_tokens")

		// Retry-After: the slow key's one token is spent; the client waits as told.
		sc := openai.NewClient(option.WithBaseURL(base+"/"), option.WithAPIKey(slow), option.WithMaxRetries(2))
		_, err = sc.Completions.New(ctx, openai.CompletionNewParams{Model: "demo", MaxTokens: openai.Int(1), Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("x")}})
		require.NoError(t, err)
		start := time.Now()
		_, err = sc.Completions.New(ctx, openai.CompletionNewParams{Model: "demo", MaxTokens: openai.Int(1), Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("x")}})
		require.NoError(t, err)
		require.Greater(t, time.Since(start), 500*time.Millisecond, "retried after the router's Retry-After")
	})
}
