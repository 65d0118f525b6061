package sim

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"
)

// adapterDir writes a PEFT adapter directory of rank r.
func adapterDir(t *testing.T, r int) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "adapter_config.json"), []byte(fmt.Sprintf(`{"peft_type":"LORA","r":%d,"lora_alpha":16}`, r)), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "adapter_model.safetensors"), []byte("weights"), 0o644))
	return dir
}

// loraInfo reads vllm:lora_requests_info's newest sample.
func loraInfo(t *testing.T, url string) (running, waiting, max string) {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	f := fams["vllm:lora_requests_info"]
	require.NotNil(t, f, "the engine exposes vllm:lora_requests_info")
	best := -1.0
	for _, m := range f.GetMetric() {
		if v := m.GetGauge().GetValue(); v > best {
			best = v
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "running_lora_adapters":
					running = l.GetValue()
				case "waiting_lora_adapters":
					waiting = l.GetValue()
				case "max_lora":
					max = l.GetValue()
				}
			}
		}
	}
	return running, waiting, max
}

// TestLoRALikeVLLM: the load and unload endpoints with vLLM's answers, the
// adapters as models, and the scheduler's limit of --max-loras adapters in
// a step.
func TestLoRALikeVLLM(t *testing.T) {
	p := Presets["llama-8b-h100-tp1"].Params
	p.LoRALoad = 50 * time.Millisecond
	url := simURL(t, func(c *serveConfig) {
		c.lora = loraConfig{enabled: true, maxLoras: 1, maxRank: 16, cpu: 2, runtime: true}
	})
	sql, big := adapterDir(t, 8), adapterDir(t, 32)

	resp, body := post(t, url+"/v1/load_lora_adapter", `{"lora_name":"sql","lora_path":"`+sql+`"}`)
	require.Equal(t, 200, resp.StatusCode, body)
	require.Equal(t, "Success: LoRA adapter 'sql' added successfully.", body)
	resp, body = post(t, url+"/v1/load_lora_adapter", `{"lora_name":"sql","lora_path":"`+sql+`"}`)
	require.Equal(t, 400, resp.StatusCode)
	require.Contains(t, body, "The lora adapter 'sql' has already been loaded.")
	resp, body = post(t, url+"/v1/load_lora_adapter", `{"lora_name":"nope","lora_path":"/does/not/exist"}`)
	require.Equal(t, 404, resp.StatusCode)
	require.Contains(t, body, "No adapter found")
	resp, body = post(t, url+"/v1/load_lora_adapter", `{"lora_name":"big","lora_path":"`+big+`"}`)
	require.Equal(t, 400, resp.StatusCode)
	require.Contains(t, body, "LoRA rank 32 is greater than max_lora_rank 16.")
	resp, body = post(t, url+"/v1/load_lora_adapter", `{"lora_name":"x"}`)
	require.Equal(t, 400, resp.StatusCode)
	require.Contains(t, body, "Both 'lora_name' and 'lora_path' must be provided.")
	resp, body = post(t, url+"/v1/load_lora_adapter", `{"lora_name":"chat","lora_path":"`+adapterDir(t, 16)+`"}`)
	require.Equal(t, 200, resp.StatusCode, body)

	r, err := http.Get(url + "/v1/models")
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	m := decodeJSON(t, string(b))
	data := m["data"].([]any)
	require.Len(t, data, 3)
	card := data[1].(map[string]any)
	require.Equal(t, "sql", card["id"])
	require.Equal(t, "m", card["parent"])
	require.Equal(t, sql, card["root"])

	resp, body = post(t, url+"/v1/completions", `{"model":"sql","prompt":"hi","max_tokens":2}`)
	require.Equal(t, 200, resp.StatusCode, body)
	require.Contains(t, body, `"model":"sql"`)
	resp, body = post(t, url+"/v1/completions", `{"model":"other","prompt":"hi","max_tokens":2}`)
	require.Equal(t, 404, resp.StatusCode)
	require.Contains(t, body, "The model `other` does not exist.")

	// --max-loras 1: a request of a second adapter waits while the first runs.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for _, a := range []string{"sql", "chat"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, "POST", url+"/v1/completions", strings.NewReader(`{"model":"`+a+`","prompt":"hi","max_tokens":400,"ignore_eos":true}`))
			req.Header.Set("Content-Type", "application/json")
			if resp, err := http.DefaultClient.Do(req); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	require.Eventually(t, func() bool {
		run, wait, max := loraInfo(t, url)
		return max == "1" && ((run == "sql" && wait == "chat") || (run == "chat" && wait == "sql"))
	}, 10*time.Second, 5*time.Millisecond, "one adapter runs, the other waits")
	cancel()
	wg.Wait()

	resp, body = post(t, url+"/v1/unload_lora_adapter", `{"lora_name":"sql"}`)
	require.Equal(t, 200, resp.StatusCode, body)
	require.Equal(t, "Success: LoRA adapter 'sql' removed successfully.", body)
	resp, body = post(t, url+"/v1/unload_lora_adapter", `{"lora_name":"sql"}`)
	require.Equal(t, 404, resp.StatusCode)
	require.Contains(t, body, "The lora adapter 'sql' cannot be found.")
	resp, _ = post(t, url+"/v1/completions", `{"model":"sql","prompt":"hi","max_tokens":2}`)
	require.Equal(t, 404, resp.StatusCode, "an unloaded adapter is no model")
}

// Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the endpoints do not exist; with
// it but without --enable-lora a load is refused.
func TestLoRAEndpointsNeedTheirSettings(t *testing.T) {
	url := simURL(t, func(c *serveConfig) { c.lora = loraConfig{enabled: true, maxLoras: 1, maxRank: 16, cpu: 1} })
	resp, _ := post(t, url+"/v1/load_lora_adapter", `{"lora_name":"a","lora_path":"/x"}`)
	require.Equal(t, 404, resp.StatusCode)
	url = simURL(t, func(c *serveConfig) { c.lora = loraConfig{maxLoras: 1, maxRank: 16, cpu: 1, runtime: true} })
	resp, body := post(t, url+"/v1/load_lora_adapter", `{"lora_name":"a","lora_path":"`+adapterDir(t, 8)+`"}`)
	require.Equal(t, 400, resp.StatusCode)
	require.Contains(t, body, "LoRA is not enabled. Use --enable-lora to enable LoRA.")
}

func TestLoRAFlags(t *testing.T) {
	c, err := parseServe([]string{"/m", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "16"})
	require.NoError(t, err)
	require.Equal(t, loraConfig{enabled: true, maxLoras: 4, maxRank: 64, cpu: 16}, c.lora)
	c, err = parseServe([]string{"/m", "--enable-lora"})
	require.NoError(t, err)
	require.Equal(t, 1, c.lora.cpu, "max_cpu_loras defaults to max_loras")
	_, err = parseServe([]string{"/m", "--enable-lora", "--max-loras", "8", "--max-cpu-loras", "4"})
	require.ErrorContains(t, err, "max_cpu_loras (4) must be >= max_loras (8)")
	_, err = parseServe([]string{"/m", "--max-lora-rank", "20"})
	require.ErrorContains(t, err, "argument --max-lora-rank: invalid choice: 20")
}

// The worker's cache keeps --max-cpu-loras adapters, evicting the least
// recently used one that no running request needs.
func TestLoRACacheLRU(t *testing.T) {
	l := &loraSched{maxLoras: 1, cpu: 2}
	require.True(t, l.touch("a", nil))
	require.True(t, l.touch("b", nil))
	require.False(t, l.touch("a", nil), "cached")
	require.True(t, l.touch("c", nil), "b, the least recently used, goes")
	require.Equal(t, []string{"a", "c"}, l.cache)
	require.True(t, l.touch("d", map[string]bool{"a": true}), "a runs: c goes")
	require.Equal(t, []string{"a", "d"}, l.cache)
}
