package sim

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"time"
)

// Preset is a named engine calibration with the published figures it was
// fitted to, so the bench can print simulated against published.
type Preset struct {
	Name   string
	Params Params
	// Published per-token profile: TTFT(n) = PrefillOverhead + n·PrefillPerToken
	// for a lone request, ITL at one running request, and ITL × LoadFactor
	// at MaxSeqsPublished running requests. Zero when nothing was published.
	PubPrefillOverhead time.Duration
	PubPrefillPerToken time.Duration
	PubITL             time.Duration
	PubLoadFactor      float64
	PubMaxSeqs         int
	Source             string
	// EP is the model's expert-parallel costs, for DP + EP ranks.
	EP EPModel
	// KVBytesPerToken is one token's KV cache (all layers), what a
	// prefill/decode transfer moves.
	KVBytesPerToken int64
	// PubOutTokPerGPU is a published decode throughput per GPU at
	// PubDecodeSeqs running sequences per rank of PubContext tokens (0:
	// none); the bench prints the preset's against it.
	PubOutTokPerGPU float64
	PubDecodeSeqs   int
	PubContext      int
}

// fit derives step-time parameters that reproduce a published profile:
// a lone decode step takes ITL, a full batch of maxSeqs takes ITL·factor, and
// a prefill step adds the published overhead and per-token cost.
func fit(itl, overhead, perToken time.Duration, factor float64, maxSeqs int) (base, perSeq, prefillOverhead time.Duration) {
	perSeq = time.Duration(float64(itl) * (factor - 1) / float64(maxSeqs-1))
	base = itl - perSeq
	prefillOverhead = overhead - itl
	return
}

// Presets, by name.
var Presets = map[string]Preset{}

func init() {
	// Llama-3.1-8B on one H100. Source: llm-d-inference-sim
	// manifests/latency-profiles/8b-h100-balanced-per-token.yaml (ITL 12 ms,
	// prefill 30 ms + 250 µs/token, time factor 2.0 at 16 running requests).
	// KV: 32 layers × 8 KV heads × 128 dims × 2 (K,V) × 2 bytes = 128 KiB per
	// token; (80 GB × 0.9 − 16 GB weights) / 128 KiB ≈ 430k tokens ≈ 26,800 blocks.
	// Load: Run:ai Model Streamer, ~15 GB Llama-3-8B from GP3 SSD in 14.3 s
	// (docs/design/figures.md §F2).
	b, s, o := fit(12*time.Millisecond, 30*time.Millisecond, 250*time.Microsecond, 2.0, 16)
	Presets["llama-8b-h100-tp1"] = Preset{Name: "llama-8b-h100-tp1", Params: Params{Base: b, DecodePerSeq: s, PrefillOverhead: o,
		PrefillPerToken: 250 * time.Microsecond, PerContextToken: time.Nanosecond, MaxNumSeqs: 256, MaxBatchTokens: 8192,
		NumGPUBlocks: 26800, BlockSize: 16, MaxModelLen: 131072, LoadTime: 14300 * time.Millisecond},
		PubPrefillOverhead: 30 * time.Millisecond, PubPrefillPerToken: 250 * time.Microsecond, PubITL: 12 * time.Millisecond,
		PubLoadFactor: 2.0, PubMaxSeqs: 16, Source: "llm-d-inference-sim latency-profiles/8b-h100-balanced-per-token.yaml",
		KVBytesPerToken: 128 << 10}

	// Llama-3.1-70B on 8 H100 (TP8). Source: llm-d-inference-sim
	// manifests/latency-profiles/70b-h100-tp8-throughput-per-token.yaml (ITL
	// 25 ms, prefill 80 ms + 500 µs/token, time factor 3.0 at 64 running).
	// KV: 80 layers × 8 × 128 × 2 × 2 bytes = 320 KiB per token;
	// (8 × 80 GB × 0.9 − 140 GB) / 320 KiB ≈ 1.33M tokens ≈ 83,000 blocks.
	// Load: not published in the profile; 140 GB at the ~12.7 GB/s vLLM
	// reached for DeepSeek-R1 on 8×H200 (vllm#14965) ≈ 11 s.
	b, s, o = fit(25*time.Millisecond, 80*time.Millisecond, 500*time.Microsecond, 3.0, 64)
	Presets["llama-70b-h100-tp8"] = Preset{Name: "llama-70b-h100-tp8", Params: Params{Base: b, DecodePerSeq: s, PrefillOverhead: o,
		PrefillPerToken: 500 * time.Microsecond, PerContextToken: 2 * time.Nanosecond, MaxNumSeqs: 256, MaxBatchTokens: 8192,
		NumGPUBlocks: 83000, BlockSize: 16, MaxModelLen: 131072, LoadTime: 11 * time.Second},
		PubPrefillOverhead: 80 * time.Millisecond, PubPrefillPerToken: 500 * time.Microsecond, PubITL: 25 * time.Millisecond,
		PubLoadFactor: 3.0, PubMaxSeqs: 64, Source: "llm-d-inference-sim latency-profiles/70b-h100-tp8-throughput-per-token.yaml",
		KVBytesPerToken: 320 << 10}

	// DeepSeek-R1 671B on 2 × 8 H200, TP8 × PP2 over Ray: the seed deployment.
	// No per-token profile is published for it, so the step parameters are
	// DERIVED, not measured: the 70B TP8 profile scaled by active parameters
	// (37B of 671B are active per token, so ≈ 0.55×), plus a pipeline bubble
	// for PP2 (+20 % per step). Only the load time is published: ~55 s for
	// 163 shards on 8×H200 (vllm#14965, similar on 2 nodes in #13074).
	// KV (MLA): 61 layers × 576 × 2 bytes ≈ 69 KiB per token; conservative
	// 2M tokens ≈ 125,000 blocks after activations.
	b, s, o = fit(time.Duration(25*0.55*1.2*float64(time.Millisecond)), time.Duration(80*0.55*1.2*float64(time.Millisecond)),
		time.Duration(500*0.55*float64(time.Microsecond)), 3.0, 64)
	Presets["deepseek-r1-h200-tp8pp2"] = Preset{Name: "deepseek-r1-h200-tp8pp2", Params: Params{Base: b, DecodePerSeq: s, PrefillOverhead: o,
		PrefillPerToken: time.Duration(500 * 0.55 * float64(time.Microsecond)), PerContextToken: 2 * time.Nanosecond, MaxNumSeqs: 256,
		MaxBatchTokens: 8192, NumGPUBlocks: 125000, BlockSize: 16, MaxModelLen: 131072, LoadTime: 55 * time.Second},
		Source: "derived from the 70B TP8 profile (no published profile); load time from vllm#14965", KVBytesPerToken: 69 << 10}
}

func init() {
	// DeepSeek-R1 671B as one wide-EP rank: one H200 per DP rank (TP1),
	// experts spread over the group (EP = DP), DeepEP low-latency
	// all-to-all, EPLB. FITTED to one published figure: ~2.2k output
	// tokens/s per H200 for wide-EP decode (llm-d v0.3 on vLLM, 32-way EP
	// over InfiniBand CX-7; docs/design/figures.md): a decode step of a full
	// batch (256 sequences, vLLM's default max_num_seqs, of 3k tokens) over
	// 2 nodes takes 116 ms, 256 / 0.116 s ≈ 2.2k tokens/s. How that step
	// splits into the base, per-sequence, context and all-to-all terms is an
	// assumption, not a measurement. KV (MLA): 69 KiB per token; 141 GB ×
	// 0.9 − 42 GB of weights (671B FP8 over 16 ranks) − DeepEP buffers and
	// activations ≈ 66 GB ≈ 960k tokens (60,000 blocks). Prefill: 150 µs per
	// token per GPU, from SGLang's 52.3k input tokens/s per 8-H100 node
	// (lmsys 2025-05-05). Without EPLB the slowest rank is assumed 25 %
	// slower (SGLang's EPLB decode gain at 96 GPUs is far larger; at 16
	// GPUs it is smaller). One expert over 58 MoE layers ≈ 2.5 GB in FP8.
	Presets["deepseek-r1-h200-dp-ep"] = Preset{Name: "deepseek-r1-h200-dp-ep", Params: Params{Base: 20 * time.Millisecond,
		DecodePerSeq: 260 * time.Microsecond, PerContextToken: 30 * time.Nanosecond, PrefillOverhead: 30 * time.Millisecond,
		PrefillPerToken: 150 * time.Microsecond, MaxNumSeqs: 256, MaxBatchTokens: 8192, NumGPUBlocks: 60000, BlockSize: 16,
		MaxModelLen: 131072, LoadTime: 55 * time.Second},
		EP: EPModel{A2ALatency: 4 * time.Millisecond, A2APerToken: 20 * time.Microsecond, Imbalance: 1.25,
			ExpertBytes: 2500 << 20, KVBytesPerToken: 69 << 10},
		PubOutTokPerGPU: 2200, PubDecodeSeqs: 256, PubContext: 3000, KVBytesPerToken: 69 << 10,
		Source: "fitted to ~2.2k output tok/s per H200, wide-EP decode (llm-d v0.3 / vLLM blog 2025-12-17); prefill from SGLang's 96-H100 run"}

	// gpt-oss-120b (MoE, 5.1B of 117B parameters active, MXFP4 experts) on
	// H200, the model of llm-d's PD guide (8 TP1 prefill + 2 TP4 decode
	// instances on 16 H200; docs/design/figures.md §F6). No per-token
	// profile is published, so two parameters are FITTED, each to one
	// published figure, and the rest DERIVED:
	//   - prefill, 27 µs per token: llm-d's calibrated peakPrefillThroughput
	//     for this fleet, 33,821 tokens/s, measured as 8192 (the chunk,
	//     vLLM's --max-num-batched-tokens default on H100/H200) over the
	//     median idle TTFT through the P/D path (its KV transfer and first
	//     decode step included);
	//   - decode, a 10 ms base: the guide's aggregated baseline, 16 TP1
	//     replicas at 45 req/s of 5000 in / 250 out, mean E2E 6.7 s;
	//   - the batch shape (per sequence = base × 2/63, the 70B TP8 profile's
	//     factor 3.0 at 64) is ASSUMED; the context term is one token's KV
	//     read at the H200's 4.8 TB/s (36 KiB: 8 ns); no prefill step
	//     overhead (none published).
	// KV: 18 full-attention layers × 8 KV heads × 64 dims × 2 (K,V) × 2 bytes
	// = 36 KiB per token; the other 18 layers attend a 128-token window, so
	// their KV stays bounded. vLLM reported 1,630,790 HBM KV tokens per TP1
	// prefill instance (llm-d's multi-tier report), 101,924 blocks of 16.
	// Load: not published; ~65 GB of weights at the ~12.7 GB/s vLLM reached
	// for DeepSeek-R1 (vllm#14965) ≈ 5 s. TestGptOssPresetFitsItsFigures
	// checks both fits.
	gptOSS := Params{Base: 10 * time.Millisecond, DecodePerSeq: 10 * time.Millisecond * 2 / 63, PerContextToken: 8 * time.Nanosecond,
		PrefillPerToken: 27 * time.Microsecond, MaxNumSeqs: 1024, MaxBatchTokens: 8192, NumGPUBlocks: 101924, BlockSize: 16,
		MaxModelLen: 131072, LoadTime: 5 * time.Second}
	Presets["gpt-oss-120b-h200-tp1"] = Preset{Name: "gpt-oss-120b-h200-tp1", Params: gptOSS, KVBytesPerToken: 36 << 10,
		Source: "fitted to llm-d's peakPrefillThroughput 33,821 tok/s and its 16×TP1 baseline (E2E mean 6.7 s); batch shape assumed"}
	// The same model over 4 H200 (TP4), DERIVED from TP1, not measured: each
	// GPU reads a quarter of the weights and of the KV, and a step adds two
	// all-reduces per layer (36 layers at an ASSUMED ~15 µs each over
	// NVLink, 1.1 ms). KV: 4 × (141 GB × 0.9 − 5 GB) − 65 GB ≈ 420 GB ≈
	// 11.5M tokens ≈ 717,000 blocks.
	tp4 := gptOSS
	tp4.Base = gptOSS.Base/4 + 1100*time.Microsecond
	tp4.DecodePerSeq = gptOSS.DecodePerSeq / 4
	tp4.PerContextToken = 2 * time.Nanosecond
	tp4.PrefillPerToken = gptOSS.PrefillPerToken / 4
	tp4.NumGPUBlocks = 717000
	Presets["gpt-oss-120b-h200-tp4"] = Preset{Name: "gpt-oss-120b-h200-tp4", Params: tp4, KVBytesPerToken: 36 << 10,
		Source: "derived from gpt-oss-120b-h200-tp1: a quarter of the per-GPU reads plus 1.1 ms of all-reduces (assumed)"}

	// No GPU time at all: for measuring what sits in front of the engine
	// (routers, proxies) without the engine being the bottleneck.
	Presets["instant"] = Preset{Name: "instant", Params: Params{MaxNumSeqs: 1024, MaxBatchTokens: 1 << 20,
		NumGPUBlocks: 1 << 20, BlockSize: 16, MaxModelLen: 262144}, Source: "none: zero step time, for proxy benchmarks"}
}

// PresetNames lists the presets, sorted.
func PresetNames() []string {
	var out []string
	for n := range Presets {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// presetFor picks the preset from SHOAL_SIM_PRESET, else from the model
// name (and, for DeepSeek, whether it runs as DP + EP ranks; for gpt-oss,
// its tensor-parallel size).
func presetFor(model string, tp int, dpEP bool) (Preset, error) {
	if name := os.Getenv("SHOAL_SIM_PRESET"); name != "" {
		p, ok := Presets[name]
		if !ok {
			return Preset{}, fmt.Errorf("SHOAL_SIM_PRESET=%q: one of %s", name, strings.Join(PresetNames(), ", "))
		}
		return p, nil
	}
	m := strings.ToLower(model)
	switch {
	case strings.Contains(m, "deepseek") && dpEP:
		return Presets["deepseek-r1-h200-dp-ep"], nil
	case strings.Contains(m, "deepseek"):
		return Presets["deepseek-r1-h200-tp8pp2"], nil
	case strings.Contains(m, "gpt-oss") && tp >= 4:
		return Presets["gpt-oss-120b-h200-tp4"], nil
	case strings.Contains(m, "gpt-oss"):
		return Presets["gpt-oss-120b-h200-tp1"], nil
	case strings.Contains(m, "8b"):
		return Presets["llama-8b-h100-tp1"], nil
	default:
		return Presets["llama-70b-h100-tp8"], nil
	}
}
