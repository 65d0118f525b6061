package router

import (
	"context"
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoalhq/shoal/coordinator/router/h1"
	"github.com/shoalhq/shoal/internal/kvhash"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
)

// maxTokenizeAnswer bounds the engine's /tokenize answer read (a 1M-token
// prompt is under 8 MB of JSON).
const maxTokenizeAnswer = 16 << 20

// chatTokenizeFields are the chat request's fields that change what the
// chat template renders, passed on to /tokenize.
var chatTokenizeFields = []string{"messages", "tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
	"continue_final_message", "add_special_tokens"}

// tokens names the prompt's tokens as the engine will see them, when some
// candidate sends KV events (else there is nothing to match them against):
// token ids given in the request are used as they are; text goes to an
// engine's /tokenize (vLLM's, chat template included; SGLang's takes a
// prompt only, so a chat's tokens come from a vLLM candidate or not at
// all), within TokenizeTimeout. ok is false when the estimate must decide.
func (r *Router) tokens(ctx context.Context, eps []*Endpoint, path string, body []byte) ([]uint32, bool) {
	if r.cfg.KV == nil {
		return nil, false
	}
	var withEvents []*Endpoint
	for _, e := range eps {
		if h, ok := r.cfg.KV.Hasher(e.Addr); ok && (path != "/v1/chat/completions" || h.Algo != kvhash.AlgoSGLangPage) {
			withEvents = append(withEvents, e)
		}
	}
	if len(withEvents) == 0 {
		return nil, false
	}
	var req string
	switch path {
	case "/v1/completions":
		p := gjson.GetBytes(body, "prompt")
		if p.IsArray() {
			if ids, ok := tokenIDs(p); ok {
				return ids, true // already tokens
			}
			return nil, false // a batch of prompts: no single prefix
		}
		if p.Type != gjson.String {
			return nil, false
		}
		req, _ = sjson.Set(`{}`, "prompt", p.Str)
	case "/v1/chat/completions":
		req = `{}`
		for _, f := range chatTokenizeFields {
			if v := gjson.GetBytes(body, f); v.Exists() {
				req, _ = sjson.SetRaw(req, f, v.Raw)
			}
		}
		if !gjson.Get(req, "add_generation_prompt").Exists() {
			req, _ = sjson.Set(req, "add_generation_prompt", true) // vLLM's chat default
		}
	default:
		return nil, false
	}
	req, _ = sjson.Set(req, "model", gjson.GetBytes(body, "model").Str)
	ep := withEvents[r.tokRR.Add(1)%uint64(len(withEvents))]
	ctx, cancel := context.WithTimeout(ctx, r.cfg.TokenizeTimeout)
	defer cancel()
	ids, err := r.tokenize(ctx, ep.Addr, []byte(req))
	if err != nil {
		r.tokenizeFailures.Inc()
		r.log.Debug("tokenize failed; prefix-cache estimates", "backend", ep.Addr, "err", err)
		return nil, false
	}
	return ids, true
}

func (r *Router) tokenize(ctx context.Context, addr string, body []byte) ([]uint32, error) {
	hdr := []h1.Header{{Key: "Content-Type", Value: "application/json"}}
	resp, err := r.up.Do(ctx, addr, "POST", "/tokenize", hdr, body, r.cfg.TokenizeTimeout)
	if err != nil {
		return nil, err
	}
	defer resp.Close()
	b, err := io.ReadAll(io.LimitReader(resp, maxTokenizeAnswer+1))
	if err != nil {
		return nil, err
	}
	if resp.Status != 200 {
		return nil, fmt.Errorf("/tokenize answered %d: %s", resp.Status, truncateBytes(b, 200))
	}
	if len(b) > maxTokenizeAnswer {
		return nil, fmt.Errorf("/tokenize answer over %d bytes", maxTokenizeAnswer)
	}
	t := gjson.GetBytes(b, "tokens")
	ids, ok := tokenIDs(t)
	if !ok {
		return nil, fmt.Errorf("/tokenize answer without a token list: %s", truncateBytes(b, 200))
	}
	return ids, nil
}

// tokenIDs reads a JSON array of token ids.
func tokenIDs(v gjson.Result) ([]uint32, bool) {
	if !v.IsArray() {
		return nil, false
	}
	var out []uint32
	ok := true
	v.ForEach(func(_, x gjson.Result) bool {
		if x.Type != gjson.Number || x.Num < 0 || x.Num > math.MaxUint32 || x.Num != math.Trunc(x.Num) || strings.ContainsAny(x.Raw, ".eE") {
			ok = false
			return false
		}
		out = append(out, uint32(x.Uint()))
		return true
	})
	return out, ok
}

// registerKVIndexMetrics reports the index's size.
func registerKVIndexMetrics(reg *prometheus.Registry, kv *KVIndex) {
	gauge := func(name, help string, f func(KVIndexStats) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return f(kv.Stats()) })
	}
	reg.MustRegister(
		gauge("shoal_router_kv_index_replicas", "Replicas whose engines' KV events the router follows.", func(s KVIndexStats) float64 { return float64(s.Replicas) }),
		gauge("shoal_router_kv_index_blocks", "KV-cache blocks indexed, all replicas.", func(s KVIndexStats) float64 { return float64(s.Blocks) }),
		gauge("shoal_router_kv_index_bytes", "Memory the KV index holds (blocks × bytes per block).", func(s KVIndexStats) float64 { return float64(s.Bytes) }),
		gauge("shoal_router_kv_index_max_blocks", "The bound on blocks indexed.", func(s KVIndexStats) float64 { return float64(s.Max) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "shoal_router_kv_index_dropped_blocks_total",
			Help: "Stored blocks not indexed because the index was full."}, func() float64 { return float64(kv.Stats().Dropped) }),
	)
}
