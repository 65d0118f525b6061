package engine

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const v1Metrics = `# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 100
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 40
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="0.1"} 1
vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="+Inf"} 2
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 2
`

func TestParseVLLMMetrics(t *testing.T) {
	m, err := ParseVLLMMetrics(strings.NewReader(v1Metrics))
	require.NoError(t, err)
	require.Equal(t, Metrics{Running: 3, Waiting: 2, KVCacheUsage: 0.25, GenerationTokens: 100, PrefixQueries: 40, PrefixHits: 10,
		TTFTSum: 0.5, TTFTCount: 2, Ranks: map[string]RankLoad{"0": {Running: 3, Waiting: 2, KVCacheUsage: 0.25}}}, m)

	v0 := strings.ReplaceAll(v1Metrics, "kv_cache_usage_perc", "gpu_cache_usage_perc")
	v0 = strings.ReplaceAll(v0, `engine="0",`, "")
	m, err = ParseVLLMMetrics(strings.NewReader(v0))
	require.NoError(t, err)
	require.Equal(t, 0.25, m.KVCacheUsage)

	m, err = ParseVLLMMetrics(strings.NewReader("# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 40\n"))
	require.NoError(t, err)
	require.InDelta(t, 0.4, m.KVCacheUsage, 1e-9, "0-100 scale is normalised")

	_, err = ParseVLLMMetrics(strings.NewReader("vllm:num_requests_running{{{ 3\n"))
	require.Error(t, err)
}

// Per-engine load is kept by the engine label, and merging the /metrics of
// several API servers counts an engine two of them report once.
func TestMergeServers(t *testing.T) {
	page := func(engines map[string][3]float64, gen float64) Metrics {
		var b strings.Builder
		b.WriteString("# TYPE vllm:num_requests_running gauge\n")
		for e, v := range engines {
			fmt.Fprintf(&b, "vllm:num_requests_running{engine=%q,model_name=\"m\"} %v\n", e, v[0])
		}
		b.WriteString("# TYPE vllm:num_requests_waiting gauge\n")
		for e, v := range engines {
			fmt.Fprintf(&b, "vllm:num_requests_waiting{engine=%q,model_name=\"m\"} %v\n", e, v[1])
		}
		b.WriteString("# TYPE vllm:kv_cache_usage_perc gauge\n")
		for e, v := range engines {
			fmt.Fprintf(&b, "vllm:kv_cache_usage_perc{engine=%q,model_name=\"m\"} %v\n", e, v[2])
		}
		fmt.Fprintf(&b, "# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{engine=\"0\",model_name=\"m\"} %v\n", gen)
		m, err := ParseVLLMMetrics(strings.NewReader(b.String()))
		require.NoError(t, err)
		return m
	}
	a := page(map[string][3]float64{"0": {2, 1, 0.5}, "1": {3, 0, 0.25}}, 10)
	require.Equal(t, 5.0, a.Running, "one server: its engines add up")
	require.Equal(t, RankLoad{Running: 3, KVCacheUsage: 0.25}, a.Ranks["1"])
	// Hybrid: disjoint ranks per server; they add.
	b := page(map[string][3]float64{"2": {4, 2, 0.75}}, 5)
	m := MergeServers([]Metrics{a, b})
	require.Equal(t, 9.0, m.Running)
	require.Equal(t, 3.0, m.Waiting)
	require.Equal(t, 0.75, m.KVCacheUsage, "the fullest rank")
	require.Equal(t, 15.0, m.GenerationTokens, "tokens are counted by the server that served them")
	// Two API servers in front of the same engines: counted once.
	m = MergeServers([]Metrics{a, a})
	require.Equal(t, 5.0, m.Running, "no double counting across API servers")
	require.Len(t, m.Ranks, 2)
	// Unlabelled series (SGLang): each server is its own engine.
	u, err := ParseVLLMMetrics(strings.NewReader("# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"m\"} 4\n"))
	require.NoError(t, err)
	require.Equal(t, 8.0, MergeServers([]Metrics{u, u}).Running)
}

// vLLM keeps every label set of vllm:lora_requests_info it ever set, each
// at the time it was last set: the newest says what runs and waits.
func TestLoRARequestsInfo(t *testing.T) {
	page := `# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="chat,math"} 1.8e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.75e9
`
	m, err := ParseVLLMMetrics(strings.NewReader(page))
	require.NoError(t, err)
	require.Equal(t, []string{"sql", "chat", "math"}, m.LoRAActive)
	m, err = ParseVLLMMetrics(strings.NewReader(v1Metrics))
	require.NoError(t, err)
	require.Nil(t, m.LoRAActive)
}
