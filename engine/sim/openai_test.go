package sim

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func postHdr(t *testing.T, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var b strings.Builder
	_, _ = bufio.NewReader(resp.Body).WriteTo(&b)
	return resp, b.String()
}

func decodeJSON(t *testing.T, s string) map[string]any {
	t.Helper()
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(s), &v), s)
	return v
}

func simURL(t *testing.T, mut func(*serveConfig)) string {
	p := Presets["llama-8b-h100-tp1"].Params
	cfg := serveConfig{model: "/models/m", served: "m", maxModelLen: p.MaxModelLen}
	if mut != nil {
		mut(&cfg)
	}
	_, url := testServerWith(t, cfg, p, 100)
	return url
}

// TestSimRequestFidelity: what OpenAI clients look at, as vLLM answers it.
func TestSimRequestFidelity(t *testing.T) {
	url := simURL(t, nil)
	t.Run("n choices", func(t *testing.T) {
		_, b := postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"n":3,"max_tokens":4}`)
		cs := decodeJSON(t, b)["choices"].([]any)
		require.Len(t, cs, 3)
		for i, c := range cs {
			require.Equal(t, float64(i), c.(map[string]any)["index"])
		}
		resp, _ := postHdr(t, url+"/v1/completions", `{"model":"m","prompt":"x","n":0}`)
		require.Equal(t, 400, resp.StatusCode)
	})
	t.Run("prompt lists and token ids", func(t *testing.T) {
		_, b := postHdr(t, url+"/v1/completions", `{"model":"m","prompt":["a","b"],"n":2,"max_tokens":2}`)
		v := decodeJSON(t, b)
		require.Len(t, v["choices"], 4)
		_, b = postHdr(t, url+"/v1/completions", `{"model":"m","prompt":[1,2,3,4,5],"max_tokens":2}`)
		require.Equal(t, 5.0, decodeJSON(t, b)["usage"].(map[string]any)["prompt_tokens"])
		_, b = postHdr(t, url+"/v1/completions", `{"model":"m","prompt":[[1,2],[3]],"max_tokens":2}`)
		require.Len(t, decodeJSON(t, b)["choices"], 2)
	})
	t.Run("echo", func(t *testing.T) {
		_, b := postHdr(t, url+"/v1/completions", `{"model":"m","prompt":"Once upon","echo":true,"max_tokens":2}`)
		c := decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)
		require.True(t, strings.HasPrefix(c["text"].(string), "Once upon"))
	})
	t.Run("logprobs", func(t *testing.T) {
		_, b := postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":2,"max_tokens":3,"ignore_eos":true}`)
		lp := decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)["logprobs"].(map[string]any)["content"].([]any)
		require.Len(t, lp, 3)
		first := lp[0].(map[string]any)
		require.LessOrEqual(t, first["logprob"], 0.0)
		require.Len(t, first["top_logprobs"], 2)
		require.NotEmpty(t, first["bytes"])
		_, b = postHdr(t, url+"/v1/completions", `{"model":"m","prompt":"x","logprobs":1,"max_tokens":3,"ignore_eos":true}`)
		clp := decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)["logprobs"].(map[string]any)
		require.Len(t, clp["tokens"], 3)
		require.Len(t, clp["token_logprobs"], 3)
		require.Len(t, clp["top_logprobs"], 3)
		require.Len(t, clp["text_offset"], 3)
		resp, b := postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"top_logprobs":2}`)
		require.Equal(t, 400, resp.StatusCode)
		require.Contains(t, b, "`logprobs` must be set to true")
	})
	t.Run("temperature draws anew, a seed repeats", func(t *testing.T) {
		outs := map[string]bool{}
		for i := 0; i < 4; i++ {
			_, b := postHdr(t, url+"/v1/completions", `{"model":"m","prompt":"same","max_tokens":6,"ignore_eos":true}`)
			outs[decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)["text"].(string)] = true
		}
		require.Greater(t, len(outs), 1, "temperature 1 (the default) without a seed samples anew")
		seeded := map[string]bool{}
		for i := 0; i < 3; i++ {
			_, b := postHdr(t, url+"/v1/completions", `{"model":"m","prompt":"same","max_tokens":6,"seed":42}`)
			seeded[decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)["text"].(string)] = true
		}
		require.Len(t, seeded, 1)
	})
	t.Run("ids from X-Request-Id", func(t *testing.T) {
		_, b := postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}`, "X-Request-Id", "abc-123")
		require.Equal(t, "chatcmpl-abc-123", decodeJSON(t, b)["id"])
		_, b = postHdr(t, url+"/v1/completions", `{"model":"m","prompt":"x","max_tokens":1}`, "X-Request-Id", "abc-123")
		require.Equal(t, "cmpl-abc-123", decodeJSON(t, b)["id"])
	})
	t.Run("validation as vLLM answers it", func(t *testing.T) {
		for body, want := range map[string]string{
			`{"model":"m","prompt":"x","stream_options":{"include_usage":true}}`: "Stream options can only be defined when `stream=True`.",
			`{"model":"m","prompt":"x","max_tokens":"many"}`:                     "Input should be a valid integer",
			`{"model":"m","prompt":"x","n":1.5}`:                                 "Input should be a valid integer",
			`[1, 2]`:                                                             "'loc': ('body',), 'msg': 'Input should be a valid dictionary'",
		} {
			resp, b := postHdr(t, url+"/v1/completions", body)
			require.Equal(t, 400, resp.StatusCode, body)
			require.Contains(t, b, want)
			require.NotContains(t, b, "Go struct", "no Go type names")
			require.NotContains(t, b, "genRequest")
		}
		req, _ := http.NewRequest("POST", url+"/v1/completions", strings.NewReader(`{"model":"m","prompt":"x"}`))
		req.Header.Set("Content-Type", "text/plain")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, 400, resp.StatusCode, "a body that is not declared JSON is not parsed")
	})
	t.Run("structured output", func(t *testing.T) {
		schema := `{"type":"object","properties":{"city":{"type":"string"},"population":{"type":"integer","minimum":1},"capital":{"type":"boolean"},"tags":{"type":"array","items":{"type":"string"}},"kind":{"enum":["town","city"]}},"required":["city","population"]}`
		_, b := postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"c","schema":`+schema+`}}}`)
		content := decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)["message"].(map[string]any)["content"].(string)
		out := decodeJSON(t, content)
		require.IsType(t, "", out["city"])
		require.IsType(t, 0.0, out["population"])
		require.GreaterOrEqual(t, out["population"], 1.0)
		require.IsType(t, true, out["capital"])
		require.IsType(t, []any{}, out["tags"])
		require.Contains(t, []any{"town", "city"}, out["kind"])
		_, b = postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}`)
		content = decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)["message"].(map[string]any)["content"].(string)
		decodeJSON(t, content)
	})
}

var weatherTool = `"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]`

// TestSimToolCalls: tool_choice "auto" needs --enable-auto-tool-choice and
// --tool-call-parser (vLLM's 400 otherwise); with them the answer is a tool
// call, whole or in vLLM's streamed deltas.
func TestSimToolCalls(t *testing.T) {
	plain := simURL(t, nil)
	resp, b := postHdr(t, plain+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"weather?"}],`+weatherTool+`,"tool_choice":"auto"}`)
	require.Equal(t, 400, resp.StatusCode)
	require.Equal(t, `"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set`, decodeJSON(t, b)["error"].(map[string]any)["message"])
	_, err := parseServe([]string{"/m", "--enable-auto-tool-choice"})
	require.ErrorContains(t, err, "--enable-auto-tool-choice requires --tool-call-parser")
	c, err := parseServe([]string{"/m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"})
	require.NoError(t, err)
	require.True(t, c.autoToolChoice)

	url := simURL(t, func(c *serveConfig) { c.autoToolChoice, c.toolParser = true, "hermes" })
	_, b = postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"weather?"}],`+weatherTool+`}`)
	ch := decodeJSON(t, b)["choices"].([]any)[0].(map[string]any)
	require.Equal(t, "tool_calls", ch["finish_reason"])
	msg := ch["message"].(map[string]any)
	require.Nil(t, msg["content"])
	call := msg["tool_calls"].([]any)[0].(map[string]any)
	require.Equal(t, "function", call["type"])
	require.True(t, strings.HasPrefix(call["id"].(string), "chatcmpl-tool-"))
	fn := call["function"].(map[string]any)
	require.Equal(t, "get_weather", fn["name"])
	require.IsType(t, "", decodeJSON(t, fn["arguments"].(string))["city"])

	_, b = postHdr(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"weather?"}],`+weatherTool+`,"stream":true}`)
	var args strings.Builder
	var name, finish string
	for _, line := range strings.Split(b, "\n") {
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		c := decodeJSON(t, data)["choices"].([]any)[0].(map[string]any)
		if f, ok := c["finish_reason"].(string); ok {
			finish = f
		}
		d := c["delta"].(map[string]any)
		if tcs, ok := d["tool_calls"].([]any); ok {
			f := tcs[0].(map[string]any)["function"].(map[string]any)
			if n, ok := f["name"].(string); ok {
				name = n
			}
			args.WriteString(f["arguments"].(string))
		}
	}
	require.Equal(t, "get_weather", name)
	require.Equal(t, "tool_calls", finish)
	decodeJSON(t, args.String())
}

// TestSimOtherEndpoints: /detokenize, the Responses API whole and
// streamed, and the pooling endpoints (refused by a generative model).
func TestSimOtherEndpoints(t *testing.T) {
	url := simURL(t, nil)
	_, b := postHdr(t, url+"/detokenize", `{"model":"m","tokens":[1,2,3]}`)
	require.NotEmpty(t, decodeJSON(t, b)["prompt"])

	_, b = postHdr(t, url+"/v1/responses", `{"model":"m","input":"hi","max_output_tokens":4}`, "X-Request-Id", "r1")
	v := decodeJSON(t, b)
	require.Equal(t, "resp_r1", v["id"])
	require.Equal(t, "response", v["object"])
	require.Equal(t, "completed", v["status"])
	part := v["output"].([]any)[0].(map[string]any)["content"].([]any)[0].(map[string]any)
	require.Equal(t, "output_text", part["type"])
	require.NotEmpty(t, part["text"])

	resp, b := postHdr(t, url+"/v1/responses", `{"model":"m","input":[{"role":"user","content":"hi"}],"stream":true,"max_output_tokens":3}`)
	require.Equal(t, "text/event-stream; charset=utf-8", resp.Header.Get("Content-Type"))
	var types []string
	for _, line := range strings.Split(b, "\n") {
		if e, ok := strings.CutPrefix(line, "event: "); ok {
			types = append(types, e)
		}
	}
	require.Equal(t, "response.created", types[0])
	require.Contains(t, types, "response.output_text.delta")
	require.Equal(t, "response.completed", types[len(types)-1])

	for _, p := range []string{"/v1/score", "/v1/rerank", "/pooling", "/classify"} {
		resp, b := postHdr(t, url+p, `{"model":"m","input":"x"}`)
		require.Equal(t, 400, resp.StatusCode, p)
		require.Contains(t, b, "The model does not support")
	}
	pool := simURL(t, func(c *serveConfig) { c.pooling = true })
	_, b = postHdr(t, pool+"/v1/score", `{"model":"m","text_1":"a","text_2":["a","b"]}`)
	require.Len(t, decodeJSON(t, b)["data"], 2)
	_, b = postHdr(t, pool+"/v1/rerank", `{"model":"m","query":"a","documents":["b","a","c"],"top_n":2}`)
	res := decodeJSON(t, b)["results"].([]any)
	require.Len(t, res, 2)
	require.GreaterOrEqual(t, res[0].(map[string]any)["relevance_score"], res[1].(map[string]any)["relevance_score"])
	_, b = postHdr(t, pool+"/pooling", `{"model":"m","input":["a"]}`)
	require.Len(t, decodeJSON(t, b)["data"], 1)
	_, b = postHdr(t, pool+"/classify", `{"model":"m","input":"a"}`)
	require.Len(t, decodeJSON(t, b)["data"], 1)
	resp, _ = postHdr(t, pool+"/v1/responses", `{"model":"m","input":"x"}`)
	require.Equal(t, 400, resp.StatusCode)
}
