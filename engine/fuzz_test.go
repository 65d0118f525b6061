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
	f.Add([]byte("vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_running{engine=\"1\"} 3\nvllm:num_requests_waiting{engine=\"1\"} 1\n"))
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
		// Per-engine load adds up to the whole, and one server merged alone
		// is itself.
		var run, wait float64
		for _, l := range m.Ranks {
			run, wait = run+l.Running, wait+l.Waiting
		}
		if !near(run, m.Running) || !near(wait, m.Waiting) {
			t.Fatalf("ranks add up to %v/%v, the whole is %v/%v: %q", run, wait, m.Running, m.Waiting, b)
		}
		if one := MergeServers([]Metrics{m}); !near(one.Running, m.Running) || !near(one.Waiting, m.Waiting) {
			t.Fatalf("merging one server changed it: %+v against %+v", one, m)
		}
	})
}

func near(a, b float64) bool {
	if math.IsInf(a, 0) || math.IsInf(b, 0) {
		return a == b
	}
	return math.Abs(a-b) <= 1e-9*math.Max(1, math.Max(math.Abs(a), math.Abs(b)))
}
