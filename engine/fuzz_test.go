package engine

import (
	"bytes"
	"math"
	"testing"
)

// The agent parses whatever an engine's /metrics returns: garbage must give
// an error or sane numbers, never a panic.
func FuzzParseVLLMMetrics(f *testing.F) {
	f.Add([]byte("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 3\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n"))
	f.Add([]byte("vllm:generation_tokens_total 1e400\n"))
	f.Add([]byte("sglang:num_running_reqs NaN\n"))
	f.Add([]byte("{{{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseVLLMMetrics(bytes.NewReader(b))
		if err != nil {
			return
		}
		for _, v := range []float64{m.Running, m.Waiting, m.KVCacheUsage} {
			if math.IsNaN(v) || v < 0 {
				t.Fatalf("parsed a nonsensical value %v from %q", v, b)
			}
		}
	})
}
