package sim

import (
	"strconv"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/prometheus/client_golang/prometheus"
)

// Bucket boundaries from vLLM's loggers.py (docs/design/wire.md §B1).
var (
	ttftBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560}
	e2eBuckets  = []float64{0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680}
	itlBuckets  = []float64{0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}
)

// buckets125 is vLLM's 1-2-5 series up to limit (build_1_2_5_buckets).
func buckets125(limit int) []float64 {
	var out []float64
	for m := 1; ; m *= 10 {
		for _, k := range []int{1, 2, 5} {
			if k*m > limit {
				return out
			}
			out = append(out, float64(k*m))
		}
	}
}

// metrics holds the engine's vLLM-named series on its own registry.
type metrics struct {
	reg         *prometheus.Registry
	running     prometheus.Gauge
	waiting     prometheus.Gauge
	kv          prometheus.Gauge
	prompt      prometheus.Counter
	generation  prometheus.Counter
	preemptions prometheus.Counter
	success     *prometheus.CounterVec
	ttftH       prometheus.Observer
	e2eH        prometheus.Observer
	prefixQ     prometheus.Counter
	prefixH     prometheus.Counter
	itl         prometheus.Observer
	queueT      prometheus.Observer
	prefillT    prometheus.Observer
	decodeT     prometheus.Observer
	inferenceT  prometheus.Observer
	promptN     prometheus.Observer
	genN        prometheus.Observer
	iterN       prometheus.Observer
	hitRate     prometheus.Gauge // SGLang only: a gauge where vLLM has counters
	hits, qs    float64
	eng         *Engine
	labels      prometheus.Labels
	nixl        *nixlMetrics
	loraInfo    *prometheus.GaugeVec // vllm:lora_requests_info (--enable-lora)
}

// nixlMetrics are vLLM's NixlConnector series (KVConnectorPromMetrics):
// D counts its reads (time, bytes) and failed ones, P the requests whose
// lease ran out before D read them.
type nixlMetrics struct {
	xfer, bytes     prometheus.Observer
	failed, expired prometheus.Counter
}

// enableNIXL registers the connector's series once (a process's DP ranks
// share one connector) and returns them.
func (m *metrics) enableNIXL() *nixlMetrics {
	if m.nixl != nil {
		return m.nixl
	}
	h := func(name, help string, buckets []float64) prometheus.Observer {
		x := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, ConstLabels: m.labels, Buckets: buckets})
		m.reg.MustRegister(x)
		return x
	}
	c := func(name, help string) prometheus.Counter {
		x := prometheus.NewCounter(prometheus.CounterOpts{Name: name + "_total", Help: help, ConstLabels: m.labels})
		m.reg.MustRegister(x)
		return x
	}
	m.nixl = &nixlMetrics{
		xfer:    h("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.", []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}),
		bytes:   h("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", []float64{1 << 20, 8 << 20, 64 << 20, 256 << 20, 1 << 30, 4 << 30}),
		failed:  c("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers."),
		expired: c("vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire."),
	}
	return m.nixl
}

// newMetrics registers vLLM V1 names, or the V0-era ones when v0 is set, so the
// coordinator's handling of both can be tested.
func newMetrics(model string, numBlocks, blockSize, maxModelLen, maxBatchTokens int, v0 bool) *metrics {
	return newMetricsFlavor(model, numBlocks, blockSize, maxModelLen, maxBatchTokens, v0, "")
}

// newMetricsFlavor registers the series under vLLM's names, or SGLang's when
// flavor is "sglang" (series SGLang lacks go to a registry nobody scrapes).
func newMetricsFlavor(model string, numBlocks, blockSize, maxModelLen, maxBatchTokens int, v0 bool, flavor string) *metrics {
	return newRankMetrics(prometheus.NewRegistry(), -1, true, model, numBlocks, blockSize, maxModelLen, maxBatchTokens, v0, flavor)
}

// newRankMetrics registers one engine's series on reg. rank ≥ 0 is a DP
// rank of a process that runs several: vLLM labels each engine's series
// engine="<rank>" (SGLang, in the simulator, dp_rank="<rank>"), and only
// the first registers the process-wide cache_config_info. rank -1 is a
// process's one engine (engine="0").
func newRankMetrics(reg *prometheus.Registry, rank int, first bool, model string, numBlocks, blockSize, maxModelLen, maxBatchTokens int, v0 bool, flavor string) *metrics {
	labels := prometheus.Labels{"model_name": model, "engine": "0"}
	if v0 || flavor == "sglang" {
		labels = prometheus.Labels{"model_name": model}
	}
	if rank >= 0 {
		if flavor == "sglang" {
			labels["dp_rank"] = strconv.Itoa(rank)
		} else {
			labels["engine"] = strconv.Itoa(rank)
		}
	}
	m := &metrics{reg: reg, labels: labels}
	hidden := prometheus.NewRegistry()
	// name translates a vLLM V1 name for this flavor; ok=false hides it.
	name := func(v1 string) (string, *prometheus.Registry) {
		switch {
		case flavor == "sglang":
			if n, ok := sglangNames[v1]; ok {
				return n, m.reg
			}
			return v1, hidden
		case v0:
			if n, ok := v0Names[v1]; ok {
				return n, m.reg
			}
		}
		return v1, m.reg
	}
	g := func(v1, help string) prometheus.Gauge {
		n, reg := name(v1)
		x := prometheus.NewGauge(prometheus.GaugeOpts{Name: n, Help: help, ConstLabels: labels})
		reg.MustRegister(x)
		return x
	}
	c := func(v1, help string) prometheus.Counter {
		n, reg := name(v1)
		x := prometheus.NewCounter(prometheus.CounterOpts{Name: n + "_total", Help: help, ConstLabels: labels})
		reg.MustRegister(x)
		return x
	}
	h := func(v1, help string, buckets []float64) prometheus.Histogram {
		n, reg := name(v1)
		x := prometheus.NewHistogram(prometheus.HistogramOpts{Name: n, Help: help, ConstLabels: labels, Buckets: buckets})
		reg.MustRegister(x)
		return x
	}
	m.running = g("vllm:num_requests_running", "Number of requests in model execution batches.")
	m.waiting = g("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
	m.kv = g("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
	m.prompt = c("vllm:prompt_tokens", "Number of prefill tokens processed.")
	m.generation = c("vllm:generation_tokens", "Number of generation tokens processed.")
	m.preemptions = c("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
	m.prefixQ = c("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
	m.prefixH = c("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
	sn, sreg := name("vllm:request_success_total")
	m.success = prometheus.NewCounterVec(prometheus.CounterOpts{Name: sn, Help: "Count of successfully processed requests.",
		ConstLabels: labels}, []string{"finished_reason"})
	sreg.MustRegister(m.success)
	m.ttftH = h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", ttftBuckets)
	m.e2eH = h("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", e2eBuckets)
	m.itl = h("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", itlBuckets)
	m.queueT = h("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", e2eBuckets)
	m.prefillT = h("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", e2eBuckets)
	m.decodeT = h("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", e2eBuckets)
	m.inferenceT = h("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", e2eBuckets)
	m.promptN = h("vllm:request_prompt_tokens", "Number of prefill tokens processed.", buckets125(maxModelLen))
	m.genN = h("vllm:request_generation_tokens", "Number of generation tokens processed.", buckets125(maxModelLen))
	m.iterN = h("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", buckets125(maxBatchTokens))
	in, ireg := name("vllm:cache_config_info")
	info := prometheus.NewGauge(prometheus.GaugeOpts{Name: in, Help: "Information of the LLMEngine CacheConfig",
		ConstLabels: prometheus.Labels{"block_size": itoa(blockSize), "num_gpu_blocks": itoa(numBlocks), "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9"}})
	info.Set(1)
	if first || ireg != m.reg {
		ireg.MustRegister(info)
	}
	if flavor == "sglang" {
		m.hitRate = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sglang:cache_hit_rate", Help: "The prefix cache hit rate.", ConstLabels: labels})
		m.reg.MustRegister(m.hitRate)
	}
	return m
}

// v0Names are the pre-0.12 names (--show-hidden-metrics-for-version=0.10).
var v0Names = map[string]string{
	"vllm:kv_cache_usage_perc":         "vllm:gpu_cache_usage_perc",
	"vllm:prefix_cache_queries":        "vllm:gpu_prefix_cache_queries",
	"vllm:prefix_cache_hits":           "vllm:gpu_prefix_cache_hits",
	"vllm:inter_token_latency_seconds": "vllm:time_per_output_token_seconds",
}

func (m *metrics) setQueues(e *Engine) {
	r, w := e.queueLens()
	m.running.Set(float64(r))
	m.waiting.Set(float64(w))
}

func (m *metrics) setKV(v float64) {
	if v < 0 {
		v = 0
	}
	if v > 1 {
		v = 1
	}
	m.kv.Set(v)
}

func (m *metrics) step(prefill, generated int) {
	m.prompt.Add(float64(prefill))
	m.generation.Add(float64(generated))
	if prefill+generated > 0 {
		m.iterN.Observe(float64(prefill + generated))
	}
}

// request observes a finished request's phases, in engine time
// (docs/design/metrics.md: queued → scheduled → first token → last token).
func (m *metrics) request(r *request) {
	m.queueT.Observe((r.vAdmit - r.vArrival).Seconds())
	m.prefillT.Observe((r.vFirst - r.vAdmit).Seconds())
	m.decodeT.Observe((r.vLast - r.vFirst).Seconds())
	m.inferenceT.Observe((r.vLast - r.vAdmit).Seconds())
	m.promptN.Observe(float64(r.origPrompt))
	m.genN.Observe(float64(r.emitted))
}

// prefix counts prefix-cache queries and hits, in tokens (V1 semantics).
func (m *metrics) prefix(queried, hit int) {
	m.prefixQ.Add(float64(queried))
	m.prefixH.Add(float64(hit))
	if m.hitRate != nil {
		m.qs += float64(queried)
		m.hits += float64(hit)
		if m.qs > 0 {
			m.hitRate.Set(m.hits / m.qs)
		}
	}
}

func (m *metrics) preempted()             { m.preemptions.Inc() }
func (m *metrics) finished(reason string) { m.success.WithLabelValues(reason).Inc() }

// Latencies are reported in virtual seconds: what the modelled GPU would show.
func (m *metrics) ttft(d time.Duration, c Clock) { m.ttftH.Observe(virtual(d, c).Seconds()) }
func (m *metrics) e2e(d time.Duration, c Clock)  { m.e2eH.Observe(virtual(d, c).Seconds()) }

func virtual(d time.Duration, c Clock) time.Duration {
	if c.Scale <= 0 {
		return d
	}
	return time.Duration(float64(d) * c.Scale)
}

func itoa(n int) string {
	return fmtInt(n)
}

func counterValue(c interface{ Write(*dto.Metric) error }) float64 {
	var d dto.Metric
	if c.Write(&d) != nil || d.Counter == nil {
		return 0
	}
	return d.Counter.GetValue()
}
