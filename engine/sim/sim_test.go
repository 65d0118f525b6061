package sim

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"
)

func testServer(t *testing.T, p Params, scale float64) (*Server, string) {
	t.Helper()
	return testServerWith(t, serveConfig{model: "/models/m", served: "m", maxModelLen: p.MaxModelLen}, p, scale)
}

func testServerWith(t *testing.T, cfg serveConfig, p Params, scale float64) (*Server, string) {
	t.Helper()
	s := newServer(cfg, p, Clock{Scale: scale})
	ctx, cancel := context.WithCancel(context.Background())
	go s.eng.Run(ctx)
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(func() { hs.Close(); cancel() })
	return s, hs.URL
}

func post(t *testing.T, url, body string) (*http.Response, string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// TestSSEFormat checks the stream against vLLM's: data-only events, the role
// chunk first, one chunk per token, finish_reason on the last content chunk,
// the usage chunk with empty choices, then [DONE].
func TestSSEFormat(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 50)
	resp, body := post(t, url+"/v1/chat/completions",
		`{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}`)
	require.Equal(t, 200, resp.StatusCode)
	require.Equal(t, "text/event-stream; charset=utf-8", resp.Header.Get("Content-Type"))
	events := strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n")
	require.Len(t, events, 1+4+1+1, body)
	require.Equal(t, "data: [DONE]", events[len(events)-1])
	var ids = map[string]bool{}
	for i, ev := range events[:len(events)-1] {
		require.True(t, strings.HasPrefix(ev, "data: {"), ev)
		var c map[string]any
		require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(ev, "data: ")), &c))
		require.Equal(t, "chat.completion.chunk", c["object"])
		ids[c["id"].(string)] = true
		choices := c["choices"].([]any)
		switch {
		case i == 0:
			delta := choices[0].(map[string]any)["delta"].(map[string]any)
			require.Equal(t, "assistant", delta["role"])
			require.Equal(t, "", delta["content"])
		case i <= 4:
			ch := choices[0].(map[string]any)
			require.NotEmpty(t, ch["delta"].(map[string]any)["content"])
			if i == 4 {
				require.Equal(t, "length", ch["finish_reason"])
			} else {
				require.Nil(t, ch["finish_reason"])
			}
		default:
			require.Empty(t, choices)
			u := c["usage"].(map[string]any)
			require.Equal(t, 4.0, u["completion_tokens"])
			require.Equal(t, u["prompt_tokens"].(float64)+4, u["total_tokens"])
		}
	}
	require.Len(t, ids, 1, "one id for every chunk")
}

func TestErrorBodies(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 50)
	for _, c := range []struct {
		body, typ, msg string
		code           int
	}{
		{`{"model":"x","prompt":"a"}`, "NotFoundError", "The model `x` does not exist.", 404},
		{`{"model":`, "BadRequestError", "JSON decode error", 400},
		{`{"model":"m","prompt":"a","max_tokens":"x"}`, "BadRequestError", "'loc': ('body', 'max_tokens'), 'msg': 'Input should be a valid integer'", 400},
		{`{"model":"m","prompt":"a","max_tokens":0}`, "BadRequestError", "max_tokens must be at least 1", 400},
		{`{"model":"m","prompt":"a","max_tokens":100000}`, "BadRequestError", "maximum context length is 32768", 400},
	} {
		resp, body := post(t, url+"/v1/completions", c.body)
		require.Equal(t, c.code, resp.StatusCode, body)
		var e struct {
			Error map[string]any `json:"error"`
		}
		require.NoError(t, json.Unmarshal([]byte(body), &e), body)
		require.Equal(t, c.typ, e.Error["type"])
		require.Contains(t, e.Error["message"], c.msg)
		require.Equal(t, float64(c.code), e.Error["code"], "code is the integer HTTP status")
		_, hasParam := e.Error["param"]
		require.True(t, hasParam)
	}
}

func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	out := map[string]float64{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if name != "vllm:cache_config_info" {
				require.Equal(t, "m", labels["model_name"], name)
				require.Equal(t, "0", labels["engine"], name)
			}
			switch {
			case m.Gauge != nil:
				out[name] = m.GetGauge().GetValue()
			case m.Counter != nil:
				out[name] += m.GetCounter().GetValue()
			case m.Histogram != nil:
				out[name+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func TestMetricsExposition(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 50)
	resp, _ := post(t, url+"/v1/completions", `{"model":"m","prompt":"hello world","max_tokens":3}`)
	require.Equal(t, 200, resp.StatusCode)
	m := scrape(t, url)
	for _, name := range []string{"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
		"vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total", "vllm:num_preemptions_total",
		"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_count",
		"vllm:e2e_request_latency_seconds_count", "vllm:cache_config_info", "vllm:inter_token_latency_seconds_count",
		"vllm:request_queue_time_seconds_count", "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_count",
		"vllm:request_inference_time_seconds_count", "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
		"vllm:iteration_tokens_total_count"} {
		_, ok := m[name]
		require.True(t, ok, "missing %s", name)
	}
	require.Equal(t, 3.0, m["vllm:generation_tokens_total"])
	require.Equal(t, 1.0, m["vllm:time_to_first_token_seconds_count"])
	require.Equal(t, 1.0, m["vllm:request_success_total"])
	require.Equal(t, 2.0, m["vllm:inter_token_latency_seconds_count"], "3 tokens, 2 gaps")
	require.Equal(t, 1.0, m["vllm:request_decode_time_seconds_count"])
}

// ttft measures the time to the first content chunk of a streamed completion.
func ttft(t *testing.T, url, prompt string) time.Duration {
	body, _ := json.Marshal(map[string]any{"model": "m", "prompt": prompt, "max_tokens": 2, "stream": true})
	start := time.Now()
	resp, err := http.Post(url+"/v1/completions", "application/json", strings.NewReader(string(body)))
	require.NoError(t, err)
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	for {
		line, err := r.ReadString('\n')
		require.NoError(t, err)
		if strings.HasPrefix(line, "data: {") {
			return time.Since(start)
		}
	}
}

func TestTTFTGrowsWithPromptAndQueue(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 4)       // virtual time runs 4× faster than real
	short := ttft(t, url, strings.Repeat("a", 40))    // 10 tokens: ≈ 20 ms base
	long := ttft(t, url, strings.Repeat("b", 4*4000)) // 4000 tokens: + ≈ 1 s of prefill
	require.Greater(t, long, short+150*time.Millisecond, "short %v long %v", short, long)

	// Queue depth: with 4 long prefills ahead, a short prompt waits for them.
	done := make(chan struct{})
	for i := 0; i < 4; i++ {
		go func(i int) {
			_ = ttft(t, url, strings.Repeat(fmt.Sprint(i), 4*4000))
			done <- struct{}{}
		}(i)
	}
	time.Sleep(20 * time.Millisecond)
	queued := ttft(t, url, strings.Repeat("c", 40))
	t.Logf("ttft short %v long %v queued %v", short, long, queued)
	for i := 0; i < 4; i++ {
		<-done
	}
	require.Greater(t, queued, short+300*time.Millisecond, "short %v queued %v", short, queued)
}

func TestPreemptionUnderKVPressure(t *testing.T) {
	p := DefaultParams()
	p.NumGPUBlocks = 40 // 640 tokens of KV
	p.MaxModelLen = 512
	p.Base = time.Millisecond
	p.PrefillPerToken, p.DecodePerSeq, p.PerContextToken = 0, 0, 0
	s, url := testServer(t, p, 1)
	maxKV := 0.0
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			m := scrape(t, url)
			maxKV = max(maxKV, m["vllm:kv_cache_usage_perc"])
			require.LessOrEqual(t, m["vllm:kv_cache_usage_perc"], 1.0)
			require.GreaterOrEqual(t, m["vllm:kv_cache_usage_perc"], 0.0)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		go func(i int) {
			// 50 prompt tokens + 150 output tokens each: 4 × 200 > 640.
			body := fmt.Sprintf(`{"model":"m","prompt":"%s","max_tokens":150,"ignore_eos":true}`, strings.Repeat(fmt.Sprint(i), 200))
			resp, err := http.Post(url+"/v1/completions", "application/json", strings.NewReader(body))
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || !strings.Contains(string(b), `"completion_tokens":150`) {
					err = fmt.Errorf("%d %s", resp.StatusCode, b)
				}
			}
			errs <- err
		}(i)
	}
	for i := 0; i < 4; i++ {
		require.NoError(t, <-errs)
	}
	close(stop)
	m := scrape(t, url)
	require.Greater(t, m["vllm:num_preemptions_total"], 0.0, "KV pressure must preempt")
	require.Equal(t, 600.0, m["vllm:generation_tokens_total"], "every token delivered once despite preemption")
	require.Greater(t, maxKV, 0.5)
	r, w := s.eng.queueLens()
	require.Zero(t, r+w)
}

func TestFaults(t *testing.T) {
	s, url := testServer(t, DefaultParams(), 50)
	fault := func(body string) {
		resp, b := post(t, url+"/shoal-sim/faults", body)
		require.Equal(t, 200, resp.StatusCode, b)
	}
	// Errors at a rate.
	fault(`{"mode":"errors","rate":1,"code":429}`)
	resp, _ := post(t, url+"/v1/completions", `{"model":"m","prompt":"a","max_tokens":1}`)
	require.Equal(t, 429, resp.StatusCode)
	fault(`{"mode":"clear"}`)

	// Hang: everything answers, no tokens come (vllm#53157).
	fault(`{"mode":"hang"}`)
	hr, err := http.Get(url + "/health")
	require.NoError(t, err)
	hr.Body.Close()
	require.Equal(t, 200, hr.StatusCode)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	req, _ := http.NewRequestWithContext(ctx, "POST", url+"/v1/completions", strings.NewReader(`{"model":"m","prompt":"a","max_tokens":1}`))
	_, err = http.DefaultClient.Do(req)
	cancel()
	require.Error(t, err, "no tokens while hung")
	fault(`{"mode":"clear"}`)

	// A Ray worker died: /health stays 200 (vllm#16259) until a request runs,
	// then the engine is dead: 500, and /health 503.
	fault(`{"mode":"worker-dead"}`)
	hr, _ = http.Get(url + "/health")
	hr.Body.Close()
	require.Equal(t, 200, hr.StatusCode)
	resp, _ = post(t, url+"/v1/completions", `{"model":"m","prompt":"a","max_tokens":1}`)
	require.Equal(t, 500, resp.StatusCode)
	require.Eventually(t, func() bool {
		hr, err := http.Get(url + "/health")
		if err != nil {
			return false
		}
		hr.Body.Close()
		return hr.StatusCode == 503
	}, 2*time.Second, 10*time.Millisecond)
	require.ErrorIs(t, s.eng.deadErr(), s.eng.deadErr())

	resp, _ = post(t, url+"/shoal-sim/faults", `{"mode":"teleport"}`)
	require.Equal(t, 400, resp.StatusCode)
}

func TestOpenAIClientAgainstSim(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 50)
	c := openai.NewClient(option.WithBaseURL(url+"/v1/"), option.WithAPIKey("x"), option.WithMaxRetries(0))
	ctx := context.Background()
	params := openai.ChatCompletionNewParams{Model: "m", MaxTokens: openai.Int(5),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}}
	r, err := c.Chat.Completions.New(ctx, params)
	require.NoError(t, err)
	require.Equal(t, int64(5), r.Usage.CompletionTokens)
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	st := c.Chat.Completions.NewStreaming(ctx, params)
	acc := openai.ChatCompletionAccumulator{}
	for st.Next() {
		acc.AddChunk(st.Current())
	}
	require.NoError(t, st.Err())
	require.Equal(t, int64(5), acc.Usage.CompletionTokens)
	require.Equal(t, "length", acc.Choices[0].FinishReason)
	models, err := c.Models.List(ctx)
	require.NoError(t, err)
	require.Equal(t, "m", models.Data[0].ID)
	_, err = c.Completions.New(ctx, openai.CompletionNewParams{Model: "nope", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("x")}})
	var apiErr *openai.Error
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, 404, apiErr.StatusCode)
}

func TestServeFlagErrors(t *testing.T) {
	var out, errb strings.Builder
	t.Setenv("SHOAL_SIM_GPUS", "8")
	code := VLLM(context.Background(), []string{"serve", "/m", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2"}, &out, &errb)
	require.Equal(t, 1, code)
	require.Contains(t, errb.String(), "World size (16) is larger than the number of available GPUs (8) in this node")
	errb.Reset()
	code = VLLM(context.Background(), []string{"serve", "/m", "--bogus-flag", "3"}, &out, &errb)
	require.Equal(t, 2, code)
	require.Contains(t, errb.String(), "unrecognized arguments: --bogus-flag 3")
	errb.Reset()
	code = VLLM(context.Background(), []string{"serve", "/m", "--port", "http"}, &out, &errb)
	require.Equal(t, 2, code)
	require.Contains(t, errb.String(), "invalid int value: 'http'")
}

func TestPrefixCacheLowersTTFT(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 4)
	system := strings.Repeat("You are a helpful assistant that answers briefly. ", 350) // ≈ 4400 tokens
	cold := ttft(t, url, system+"What is the capital of France?")
	warm := ttft(t, url, system+"What is the tallest mountain?")
	t.Logf("ttft cold %v warm %v", cold, warm)
	require.Less(t, warm, cold/3, "a cached prefix skips most of the prefill")
	m := scrape(t, url)
	q, h := m["vllm:prefix_cache_queries_total"], m["vllm:prefix_cache_hits_total"]
	require.Greater(t, h, 4000.0, "hits are counted in tokens")
	require.Greater(t, q, 2*4000.0)
	require.Less(t, h, q)
	// Another prompt shares nothing.
	other := ttft(t, url, strings.Repeat("Unrelated text. ", 1100))
	require.Greater(t, other, cold/2)
}

// TestSSEBytes pins the exact bytes of a stream (id and created normalised).
func TestSSEBytes(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 50)
	_, body := post(t, url+"/v1/chat/completions",
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true,"stream_options":{"include_usage":true},"seed":1}`)
	body = regexp.MustCompile(`"id":"chatcmpl-[0-9a-f]{32}","object":"chat.completion.chunk","created":\d+`).
		ReplaceAllString(body, `"id":"ID","object":"chat.completion.chunk","created":0`)
	want := `data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":" a"},"logprobs":null,"finish_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":" from"},"logprobs":null,"finish_reason":"length","stop_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m","choices":[],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}

data: [DONE]

`
	require.Equal(t, want, body)
}

func TestStopStringsAndEmbeddings(t *testing.T) {
	_, url := testServer(t, DefaultParams(), 50)
	// seed 1 generates " a from …": stop at "from".
	resp, body := post(t, url+"/v1/completions", `{"model":"m","prompt":"x","max_tokens":20,"seed":1,"stop":["from"]}`)
	require.Equal(t, 200, resp.StatusCode, body)
	var c struct {
		Choices []struct {
			Text         string  `json:"text"`
			FinishReason string  `json:"finish_reason"`
			StopReason   *string `json:"stop_reason"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &c))
	require.Equal(t, "stop", c.Choices[0].FinishReason)
	require.Equal(t, "from", *c.Choices[0].StopReason)
	require.Equal(t, " a ", c.Choices[0].Text, "output ends before the stop string")
	require.Equal(t, 2, c.Usage.CompletionTokens)
	resp, _ = post(t, url+"/v1/completions", `{"model":"m","prompt":"x","stop":[""]}`)
	require.Equal(t, 400, resp.StatusCode)
	resp, _ = post(t, url+"/v1/completions", `{"model":"m","prompt":"x","stop":7}`)
	require.Equal(t, 400, resp.StatusCode)

	resp, body = post(t, url+"/v1/embeddings", `{"model":"m","input":"hello"}`)
	require.Equal(t, 400, resp.StatusCode, "a generative model serves no embeddings")
	require.Contains(t, body, "The model does not support Embeddings API")
	p := Presets["llama-8b-h100-tp1"].Params
	_, url = testServerWith(t, serveConfig{model: "/models/m", served: "m", maxModelLen: p.MaxModelLen, pooling: true}, p, 100)
	resp, body = post(t, url+"/v1/embeddings", `{"model":"m","input":["hello","hello","other"]}`)
	require.Equal(t, 200, resp.StatusCode, body)
	var e struct {
		Object string `json:"object"`
		Data   []struct {
			Index     int       `json:"index"`
			Embedding []float64 `json:"embedding"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &e))
	require.Equal(t, "list", e.Object)
	require.Len(t, e.Data, 3)
	require.Len(t, e.Data[0].Embedding, EmbeddingDim)
	require.Equal(t, e.Data[0].Embedding, e.Data[1].Embedding)
	require.NotEqual(t, e.Data[0].Embedding, e.Data[2].Embedding)
	var norm float64
	for _, x := range e.Data[0].Embedding {
		norm += x * x
	}
	require.InDelta(t, 1.0, norm, 1e-3)
	resp, _ = post(t, url+"/v1/embeddings", `{"model":"m","input":[]}`)
	require.Equal(t, 400, resp.StatusCode)
}

// TestNeverReadyAndDrain runs `vllm serve` in-process: the NCCL startup hang
// never opens the port; a normal server drains in-flight requests on SIGTERM
// within --shutdown-timeout.
func TestNeverReadyAndDrain(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.1")
	t.Setenv("SHOAL_SIM_FAULT", "nccl-hang")
	ip := "127.0.9.5"
	port := freePort(t, ip)
	args := []string{"serve", "/m", "--served-model-name", "m", "--host", ip, "--port", fmt.Sprint(port)}
	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuf
	done := make(chan int, 1)
	go func() { done <- VLLM(ctx, args, &out, &out) }()
	time.Sleep(500 * time.Millisecond)
	_, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", ip, port), 200*time.Millisecond)
	require.Error(t, err, "a startup hang never listens")
	require.Contains(t, out.String(), "ncclCommInitRank")
	cancel()
	<-done

	t.Setenv("SHOAL_SIM_FAULT", "")
	done = make(chan int, 1)
	go func() { done <- VLLM(context.Background(), append(args, "--shutdown-timeout", "5"), &out, &out) }()
	base := fmt.Sprintf("http://%s:%d", ip, port)
	waitHealthy(t, base)
	// An in-flight request of 40 tokens × ~25 ms ≈ 1 s, then SIGTERM: it completes.
	got := make(chan int, 1)
	go func() {
		r, err := http.Post(base+"/v1/completions", "application/json", strings.NewReader(`{"model":"m","prompt":"x","max_tokens":40,"ignore_eos":true}`))
		if err != nil {
			got <- 0
			return
		}
		r.Body.Close()
		got <- r.StatusCode
	}()
	time.Sleep(200 * time.Millisecond)
	require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGTERM)) // serve has a handler registered
	require.Equal(t, 200, <-got, "the in-flight request is drained, not aborted")
	require.Equal(t, 0, <-done)
	require.Contains(t, out.String(), "Received SIGTERM")
}

func TestStragglerDieAndV0Names(t *testing.T) {
	s, url := testServer(t, DefaultParams(), 4)
	// The engine's own clock (the sum of its modelled step times), not the
	// wall clock: exact under any load.
	engineTime := func(prompt string) time.Duration {
		s.eng.mu.Lock()
		before := s.eng.vnow
		s.eng.mu.Unlock()
		resp, _ := post(t, url+"/v1/completions", `{"model":"m","prompt":"`+prompt+`","max_tokens":2,"ignore_eos":true}`)
		require.Equal(t, 200, resp.StatusCode)
		s.eng.mu.Lock()
		defer s.eng.mu.Unlock()
		return s.eng.vnow - before
	}
	base := engineTime(strings.Repeat("a", 400))
	resp, _ := post(t, url+"/shoal-sim/faults", `{"mode":"slow","factor":5}`)
	require.Equal(t, 200, resp.StatusCode)
	slow := engineTime(strings.Repeat("b", 400))
	require.InEpsilon(t, 5*base, slow, 0.01, "a straggler's steps are 5× slower: base %v slow %v", base, slow)
	resp, _ = post(t, url+"/shoal-sim/faults", `{"mode":"slow","factor":0.5}`)
	require.Equal(t, 400, resp.StatusCode)

	resp, _ = post(t, url+"/shoal-sim/faults", `{"mode":"die"}`)
	require.Equal(t, 200, resp.StatusCode)
	require.Eventually(t, func() bool { return s.eng.deadErr() != nil }, time.Second, 5*time.Millisecond)
	hr, err := http.Get(url + "/health")
	require.NoError(t, err)
	hr.Body.Close()
	require.Equal(t, 503, hr.StatusCode, "engine death: /health 503")
	resp, _ = post(t, url+"/v1/completions", `{"model":"m","prompt":"a","max_tokens":1}`)
	require.Equal(t, 500, resp.StatusCode)

	// V0-era names, as --show-hidden-metrics-for-version=0.10 shows them.
	cfg := serveConfig{model: "/m", served: "m", maxModelLen: 32768, v0Metrics: true}
	v0 := newServer(cfg, DefaultParams(), Clock{Scale: 50})
	hs := httptest.NewServer(v0.Handler())
	defer hs.Close()
	r, err := http.Get(hs.URL + "/metrics")
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	require.Contains(t, string(b), "vllm:gpu_cache_usage_perc{model_name=\"m\"}")
	require.Contains(t, string(b), "vllm:time_per_output_token_seconds")
	require.NotContains(t, string(b), "vllm:kv_cache_usage_perc")
}

// A pooling model serves embeddings and refuses completions and chat with
// vLLM's 400; the flags that make one are read as vLLM reads them.
func TestPoolingModel(t *testing.T) {
	for _, args := range [][]string{{"--runner", "pooling"}, {"--task=embed"}, {"--convert", "embed"}} {
		c, err := parseServe(append([]string{"/m"}, args...))
		require.NoError(t, err, args)
		require.True(t, c.pooling, args)
	}
	c, err := parseServe([]string{"/m", "--runner", "generate"})
	require.NoError(t, err)
	require.False(t, c.pooling)
	_, err = parseServe([]string{"/m", "--runner", "embedding"})
	require.EqualError(t, err, "vllm serve: error: argument --runner: invalid choice: 'embedding' (choose from 'auto', 'generate', 'pooling')")

	cfg := serveConfig{model: "/models/e", served: "e", maxModelLen: 8192, pooling: true}
	s := newServer(cfg, Presets["llama-8b-h100-tp1"].Params, Clock{Scale: 100})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.eng.Run(ctx)
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	resp, body := post(t, hs.URL+"/v1/completions", `{"model":"e","prompt":"ping","max_tokens":1}`)
	require.Equal(t, 400, resp.StatusCode)
	require.JSONEq(t, `{"error":{"message":"The model does not support Completions API","type":"BadRequestError","param":null,"code":400}}`, body)
	resp, body = post(t, hs.URL+"/v1/chat/completions", `{"model":"e","messages":[{"role":"user","content":"ping"}]}`)
	require.Equal(t, 400, resp.StatusCode)
	require.Contains(t, body, "The model does not support Chat Completions API")
	resp, body = post(t, hs.URL+"/v1/embeddings", `{"model":"e","input":"ping"}`)
	require.Equal(t, 200, resp.StatusCode, body)
}
