package engine

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metrics is the part of an engine's /metrics the coordinator routes and
// scales on. Counters are cumulative; rates come from two snapshots.
type Metrics struct {
	Running          float64
	Waiting          float64
	KVCacheUsage     float64 // 0-1
	PrefixQueries    float64
	PrefixHits       float64
	GenerationTokens float64
	PromptTokens     float64
	TTFTSum          float64
	TTFTCount        float64
	Preemptions      float64
	// Ranks are the load gauges per engine (vLLM's engine label: the DP
	// rank; "" when the series have none, as SGLang's and V0's).
	Ranks map[string]RankLoad
	// LoRAActive are the adapters with requests running or waiting, from
	// vllm:lora_requests_info's newest sample (nil: none, or no LoRA).
	LoRAActive []string
}

// RankLoad is one engine's (DP rank's) load.
type RankLoad struct {
	Running, Waiting, KVCacheUsage float64
}

// MergeServers is a data-parallel group's metrics from each of its API
// servers' /metrics: requests and tokens are counted by the server that
// served them, so counters add up; load is per engine, and an engine that
// two servers report (vLLM's internal load balancing with several API
// servers) counts once. A server whose series carry no engine label is one
// engine of its own.
func MergeServers(ms []Metrics) Metrics {
	var out Metrics
	out.Ranks = map[string]RankLoad{}
	for i, m := range ms {
		out.PrefixQueries += m.PrefixQueries
		out.PrefixHits += m.PrefixHits
		out.GenerationTokens += m.GenerationTokens
		out.PromptTokens += m.PromptTokens
		out.TTFTSum += m.TTFTSum
		out.TTFTCount += m.TTFTCount
		out.Preemptions += m.Preemptions
		for k, l := range m.Ranks {
			if k == "" {
				k = fmt.Sprintf("server-%d", i)
			}
			cur := out.Ranks[k]
			out.Ranks[k] = RankLoad{Running: max(cur.Running, l.Running), Waiting: max(cur.Waiting, l.Waiting), KVCacheUsage: max(cur.KVCacheUsage, l.KVCacheUsage)}
		}
	}
	for _, l := range out.Ranks {
		out.Running += l.Running
		out.Waiting += l.Waiting
		out.KVCacheUsage = max(out.KVCacheUsage, l.KVCacheUsage)
	}
	return out
}

// metricNames maps each field to the names vLLM has used for it: V1 first,
// then the V0-era names (removed in 0.12) so older engines keep working.
var metricNames = []struct {
	names []string
	set   func(*Metrics, float64)
	rank  func(*RankLoad, float64)
}{
	{[]string{"vllm:num_requests_running", "sglang:num_running_reqs"}, func(m *Metrics, v float64) { m.Running += v }, func(r *RankLoad, v float64) { r.Running += v }},
	{[]string{"vllm:num_requests_waiting", "sglang:num_queue_reqs"}, func(m *Metrics, v float64) { m.Waiting += v }, func(r *RankLoad, v float64) { r.Waiting += v }},
	{[]string{"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"}, func(m *Metrics, v float64) { m.KVCacheUsage = max(m.KVCacheUsage, v) },
		func(r *RankLoad, v float64) { r.KVCacheUsage = max(r.KVCacheUsage, v) }},
	{[]string{"vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"}, func(m *Metrics, v float64) { m.PrefixQueries += v }, nil},
	{[]string{"vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"}, func(m *Metrics, v float64) { m.PrefixHits += v }, nil},
	{[]string{"vllm:generation_tokens_total", "sglang:generation_tokens_total"}, func(m *Metrics, v float64) { m.GenerationTokens += v }, nil},
	{[]string{"vllm:prompt_tokens_total", "sglang:prompt_tokens_total"}, func(m *Metrics, v float64) { m.PromptTokens += v }, nil},
	{[]string{"vllm:num_preemptions_total"}, func(m *Metrics, v float64) { m.Preemptions += v }, nil},
}

// ParseVLLMMetrics reads Prometheus text exposition from a vLLM server (or
// SGLang's, whose names differ: docs/design/engines.md §A3).
func ParseVLLMMetrics(r io.Reader) (Metrics, error) {
	var m Metrics
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return m, fmt.Errorf("parse engine metrics: %w", err)
	}
	for _, mn := range metricNames {
		for _, name := range mn.names {
			f, ok := fams[name]
			if !ok {
				continue
			}
			for _, s := range f.GetMetric() {
				mn.set(&m, value(s))
				if mn.rank != nil {
					if m.Ranks == nil {
						m.Ranks = map[string]RankLoad{}
					}
					k := labelValue(s, "engine")
					l := m.Ranks[k]
					mn.rank(&l, value(s))
					m.Ranks[k] = l
				}
			}
			break
		}
	}
	f, ok := fams["vllm:time_to_first_token_seconds"]
	if !ok {
		f, ok = fams["sglang:time_to_first_token_seconds"]
	}
	if ok {
		for _, s := range f.GetMetric() {
			if h := s.GetHistogram(); h != nil {
				m.TTFTSum += h.GetSampleSum()
				m.TTFTCount += float64(h.GetSampleCount())
			}
		}
	}
	m.LoRAActive = loraActive(fams["vllm:lora_requests_info"])
	if math.IsNaN(m.TTFTSum) || math.IsInf(m.TTFTSum, 0) || m.TTFTSum < 0 {
		m.TTFTSum, m.TTFTCount = 0, 0
	}
	if m.KVCacheUsage > 1 {
		// Some mocks (AIBrix's vllm-mock) report 0-100; real vLLM is 0-1.
		m.KVCacheUsage /= 100
		for k, l := range m.Ranks {
			l.KVCacheUsage /= 100
			m.Ranks[k] = l
		}
	}
	return m, nil
}

// labelValue is the sample's value of label name, "" without it.
func labelValue(s *dto.Metric, name string) string {
	for _, l := range s.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// value reads a sample. NaN, infinities and negatives (a broken or hostile
// engine) read as 0: they would otherwise poison routing and autoscaling.
func value(s *dto.Metric) float64 {
	var v float64
	switch {
	case s.Gauge != nil:
		v = s.GetGauge().GetValue()
	case s.Counter != nil:
		v = s.GetCounter().GetValue()
	case s.Untyped != nil:
		v = s.GetUntyped().GetValue()
	}
	if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
		return 0
	}
	return v
}

// loraActive reads vllm:lora_requests_info: vLLM sets a series per label
// set to the time of its last stats update (old label sets stay exposed),
// so the newest sample says which adapters run and wait now.
func loraActive(f *dto.MetricFamily) []string {
	if f == nil {
		return nil
	}
	var newest *dto.Metric
	for _, s := range f.GetMetric() {
		if newest == nil || value(s) > value(newest) {
			newest = s
		}
	}
	if newest == nil {
		return nil
	}
	var out []string
	for _, l := range []string{"running_lora_adapters", "waiting_lora_adapters"} {
		for _, n := range strings.Split(labelValue(newest, l), ",") {
			if n = strings.TrimSpace(n); n != "" && !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	return out
}
