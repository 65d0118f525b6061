package engine

import (
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
		TTFTSum: 0.5, TTFTCount: 2}, m)

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
