package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server is the OpenAI-compatible HTTP surface of the simulated vLLM.
type Server struct {
	cfg     serveConfig
	eng     *Engine
	m       *metrics
	created int64
	faults  *faults
	seq     atomic.Uint64
}

// faults are switched at run time through POST /shoal-sim/faults, a path real
// vLLM does not have.
type faults struct {
	mu         sync.Mutex
	workerDead bool    // guarded by mu; next step kills the engine (vllm#16259)
	errorRate  float64 // guarded by mu
	errorCode  int     // guarded by mu
}

func (f *faults) setWorkerDead(v bool) { f.mu.Lock(); f.workerDead = v; f.mu.Unlock() }

// FaultRequest is the body of POST /shoal-sim/faults.
type FaultRequest struct {
	// Mode: "die" (engine death now), "worker-dead" (silent until a step runs),
	// "hang" (answers, produces no tokens), "slow" (Factor× step time),
	// "errors" (Code at Rate), "clear".
	Mode   string  `json:"mode"`
	Rate   float64 `json:"rate,omitempty"`
	Code   int     `json:"code,omitempty"`
	Factor float64 `json:"factor,omitempty"`
}

// Handler routes the HTTP API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.chat)
	mux.HandleFunc("POST /v1/completions", s.completions)
	mux.HandleFunc("GET /v1/models", s.models)
	mux.HandleFunc("POST /v1/embeddings", s.embeddings)
	mux.HandleFunc("GET /health", s.health)
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, 200, map[string]string{"version": simVersion})
	})
	mux.HandleFunc("GET /load", func(w http.ResponseWriter, _ *http.Request) {
		r, q := s.eng.queueLens()
		writeJSON(w, 200, map[string]int{"server_load": r + q})
	})
	mux.HandleFunc("POST /tokenize", s.tokenize)
	if s.cfg.flavor != "sglang" || s.cfg.enableMetrics {
		mux.Handle("GET /metrics", promhttp.HandlerFor(s.m.reg, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("POST /shoal-sim/faults", s.setFault)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 404, map[string]string{"detail": "Not Found"})
	})
	return mux
}

func (s *Server) health(w http.ResponseWriter, _ *http.Request) {
	if s.eng.deadErr() != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) models(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, 200, map[string]any{"object": "list", "data": []any{map[string]any{
		"id": s.cfg.served, "object": "model", "created": s.created, "owned_by": s.owner(), "root": s.cfg.model,
		"parent": nil, "max_model_len": s.cfg.maxModelLen,
		"permission": []any{map[string]any{"id": "modelperm-" + strconv.FormatInt(s.created, 16), "object": "model_permission",
			"created": s.created, "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
			"allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false, "organization": "*", "group": nil, "is_blocking": false}},
	}}})
}

func (s *Server) owner() string {
	if s.cfg.flavor == "sglang" {
		return "sglang"
	}
	return "vllm"
}

func (s *Server) setFault(w http.ResponseWriter, r *http.Request) {
	var f FaultRequest
	if err := json.NewDecoder(r.Body).Decode(&f); err != nil {
		writeError(w, 400, "BadRequestError", "invalid fault body: "+err.Error(), nil)
		return
	}
	s.faults.mu.Lock()
	defer s.faults.mu.Unlock()
	switch f.Mode {
	case "die":
		go s.eng.kill(ErrEngineDead)
	case "worker-dead":
		s.faults.workerDead = true
	case "hang":
		s.eng.mu.Lock()
		s.eng.stalled = true
		s.eng.mu.Unlock()
	case "slow":
		if f.Factor < 1 {
			writeError(w, 400, "BadRequestError", "slow needs factor >= 1", nil)
			return
		}
		s.eng.mu.Lock()
		s.eng.slow = f.Factor
		s.eng.mu.Unlock()
	case "errors":
		if f.Rate < 0 || f.Rate > 1 || (f.Code != 429 && f.Code != 500 && f.Code != 503) {
			writeError(w, 400, "BadRequestError", "errors needs rate in 0-1 and code 429, 500 or 503", nil)
			return
		}
		s.faults.errorRate, s.faults.errorCode = f.Rate, f.Code
	case "clear":
		s.faults.errorRate, s.faults.workerDead = 0, false
		s.eng.mu.Lock()
		s.eng.stalled, s.eng.slow = false, 1
		s.eng.mu.Unlock()
	default:
		writeError(w, 400, "BadRequestError", "unknown fault mode "+strconv.Quote(f.Mode), nil)
		return
	}
	writeJSON(w, 200, map[string]string{"mode": f.Mode})
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

type genRequest struct {
	Model         string          `json:"model"`
	Messages      []chatMessage   `json:"messages"`
	Prompt        json.RawMessage `json:"prompt"`
	MaxTokens     *int            `json:"max_tokens"`
	MaxCompTokens *int            `json:"max_completion_tokens"`
	Stream        bool            `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	IgnoreEOS bool            `json:"ignore_eos"`
	Input     json.RawMessage `json:"input"`
	Stop      json.RawMessage `json:"stop"`
	Seed      *int64          `json:"seed"`
	N         *int            `json:"n"`
}

// contentText flattens a chat message content: a string or a list of parts.
func contentText(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", fmt.Errorf("content must be a string or a list of content parts")
	}
	var b strings.Builder
	for _, p := range parts {
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request)        { s.generate(w, r, true) }
func (s *Server) completions(w http.ResponseWriter, r *http.Request) { s.generate(w, r, false) }

func (s *Server) generate(w http.ResponseWriter, r *http.Request, chat bool) {
	if s.cfg.pooling {
		api := "Completions API"
		if chat {
			api = "Chat Completions API"
		}
		writeError(w, 400, "BadRequestError", "The model does not support "+api, nil)
		return
	}
	arrival := time.Now()
	req, ok := s.decode(w, r)
	if !ok {
		return
	}
	var prompt string
	if chat {
		if len(req.Messages) == 0 {
			writeError(w, 400, "BadRequestError", "messages: at least one message is required", nil)
			return
		}
		var b strings.Builder
		for _, m := range req.Messages {
			t, err := contentText(m.Content)
			if err != nil {
				writeError(w, 400, "BadRequestError", "messages: "+err.Error(), nil)
				return
			}
			// A chat template adds a few tokens per message.
			b.WriteString("<|" + m.Role + "|>" + t + "\n")
		}
		prompt = b.String()
	} else {
		if err := json.Unmarshal(req.Prompt, &prompt); err != nil {
			var list []string
			if json.Unmarshal(req.Prompt, &list) != nil || len(list) != 1 {
				writeError(w, 400, "BadRequestError", "prompt must be a string (or a list of one string)", nil)
				return
			}
			prompt = list[0]
		}
	}
	promptTokens := countTokens(prompt)
	if promptTokens >= s.cfg.maxModelLen {
		writeError(w, 400, "BadRequestError", fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens in the messages, Please reduce the length of the messages.", s.cfg.maxModelLen, promptTokens), nil)
		return
	}
	maxTokens := s.cfg.maxModelLen - promptTokens
	if req.MaxCompTokens != nil {
		req.MaxTokens = req.MaxCompTokens
	}
	if req.MaxTokens != nil {
		if *req.MaxTokens < 1 {
			param := "max_tokens"
			writeError(w, 400, "BadRequestError", fmt.Sprintf("max_tokens must be at least 1, got %d.", *req.MaxTokens), &param)
			return
		}
		if promptTokens+*req.MaxTokens > s.cfg.maxModelLen {
			writeError(w, 400, "BadRequestError", fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the messages, %d in the completion). Please reduce the length of the messages or completion.", s.cfg.maxModelLen, promptTokens+*req.MaxTokens, promptTokens, *req.MaxTokens), nil)
			return
		}
		maxTokens = *req.MaxTokens
	}
	if code, ok := s.injectedError(); ok {
		writeError(w, code, map[int]string{429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}[code], "injected fault", nil)
		return
	}
	if s.eng.deadErr() != nil {
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	s.faults.mu.Lock()
	workerDead := s.faults.workerDead
	s.faults.mu.Unlock()
	if workerDead {
		// The first step after a Ray worker died raises ActorDiedError and kills the engine.
		go s.eng.kill(fmt.Errorf("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task"))
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	var stops []string
	if len(req.Stop) > 0 && string(req.Stop) != "null" {
		var one string
		if json.Unmarshal(req.Stop, &one) == nil {
			stops = []string{one}
		} else if err := json.Unmarshal(req.Stop, &stops); err != nil {
			param := "stop"
			writeError(w, 400, "BadRequestError", "stop must be a string or a list of strings", &param)
			return
		}
		for _, st := range stops {
			if st == "" {
				param := "stop"
				writeError(w, 400, "BadRequestError", "stop strings must not be empty", &param)
				return
			}
		}
	}
	seed := hashString(prompt)
	if req.Seed != nil {
		seed = uint64(*req.Seed)
	}
	id := s.seq.Add(1)
	er := &request{id: strconv.FormatUint(id, 10), prompt: promptTokens, origPrompt: promptTokens, maxTokens: maxTokens,
		natural: 16 + int(seed%240), ignoreEOS: req.IgnoreEOS, seed: seed, arrival: arrival,
		hashes: blockHashes(prompt, s.eng.p.BlockSize), stops: stops,
		out: make(chan token, maxTokens+2), ctx: r.Context()}
	if err := s.eng.submit(er); err != nil {
		writeError(w, 500, "InternalServerError", err.Error(), nil)
		return
	}
	rid := fmt.Sprintf("%s-%016x%016x", map[bool]string{true: "chatcmpl", false: "cmpl"}[chat], uint64(arrival.UnixNano()), id)
	if req.Stream {
		s.stream(w, r.Context(), er, rid, chat, req.StreamOptions != nil && req.StreamOptions.IncludeUsage)
		return
	}
	var text strings.Builder
	finish := ""
	var stopReason *string
	for finish == "" {
		select {
		case t := <-er.out:
			if t.err != nil {
				writeError(w, 500, "InternalServerError", t.err.Error(), nil)
				return
			}
			text.WriteString(t.text)
			finish = t.finish
			if t.stop != "" {
				stopReason = &t.stop
			}
		case <-r.Context().Done():
			return
		}
	}
	resp := completion{ID: rid, Object: "text_completion", Created: arrival.Unix(), Model: req.Model,
		Usage: usage{PromptTokens: er.origPrompt, TotalTokens: er.origPrompt + er.emitted, CompletionTokens: er.emitted}}
	out := text.String()
	if chat {
		resp.Object = "chat.completion"
		resp.Choices = []choice{{Message: &message{Role: "assistant", Content: out, ToolCalls: []string{}}, FinishReason: finish, StopReason: stopReason}}
	} else {
		resp.Choices = []choice{{Text: &out, FinishReason: finish, StopReason: stopReason}}
	}
	writeJSON(w, 200, resp)
}

func (s *Server) stream(w http.ResponseWriter, ctx context.Context, er *request, rid string, chat, usageOn bool) {
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.WriteHeader(200)
	created := er.arrival.Unix()
	send := func(v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "data: %s\n\n", b)
		if fl != nil {
			fl.Flush()
		}
	}
	obj := "text_completion"
	head := func(choices any) chunk {
		return chunk{ID: rid, Object: obj, Created: created, Model: s.cfg.served, Choices: choices}
	}
	if chat {
		obj = "chat.completion.chunk"
		empty := ""
		send(head([]chunkChoice{{Delta: &delta{Role: "assistant", Content: &empty}}}))
	}
	for {
		select {
		case t := <-er.out:
			if t.err != nil {
				send(map[string]any{"error": map[string]any{"message": t.err.Error(), "type": "InternalServerError", "param": nil, "code": 500}})
				fmt.Fprint(w, "data: [DONE]\n\n")
				return
			}
			text := t.text
			var d *delta
			var tx *string
			if chat {
				d = &delta{Content: &text}
			} else {
				tx = &text
			}
			if t.finish == "" {
				send(head([]chunkChoice{{Delta: d, Text: tx}}))
				continue
			}
			var sr *string
			if t.stop != "" {
				sr = &t.stop
			}
			send(head([]finalChoice{{Delta: d, Text: tx, FinishReason: t.finish, StopReason: sr}}))
			if usageOn {
				send(chunk{ID: rid, Object: obj, Created: created, Model: s.cfg.served, Choices: []struct{}{},
					Usage: &usage{PromptTokens: er.origPrompt, TotalTokens: er.origPrompt + er.emitted, CompletionTokens: er.emitted}})
			}
			fmt.Fprint(w, "data: [DONE]\n\n")
			if fl != nil {
				fl.Flush()
			}
			return
		case <-ctx.Done():
			return
		}
	}
}

func (s *Server) tokenize(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Prompt string `json:"prompt"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, 400, "BadRequestError", "Invalid JSON body: "+err.Error(), nil)
		return
	}
	n := countTokens(req.Prompt)
	toks := make([]int, n)
	for i := range toks {
		toks[i] = int(hashString(req.Prompt[min(i*4, len(req.Prompt)):min(i*4+4, len(req.Prompt))]) % 128000)
	}
	writeJSON(w, 200, map[string]any{"count": n, "max_model_len": s.cfg.maxModelLen, "tokens": toks})
}

func (s *Server) injectedError() (int, bool) {
	s.faults.mu.Lock()
	defer s.faults.mu.Unlock()
	if s.faults.errorRate > 0 && rand.Float64() < s.faults.errorRate {
		return s.faults.errorCode, true
	}
	return 0, false
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError writes vLLM's nested error body (v0.10.1+): code is the HTTP status.
func writeError(w http.ResponseWriter, code int, typ, msg string, param *string) {
	writeJSON(w, code, map[string]any{"error": map[string]any{"message": msg, "type": typ, "param": param, "code": code}})
}

// EmbeddingDim is the length of the simulated embedding vectors.
const EmbeddingDim = 1024

// decode reads a request body and checks its model, answering the errors
// vLLM answers; ok is false when a response was written.
func (s *Server) decode(w http.ResponseWriter, r *http.Request) (genRequest, bool) {
	var req genRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 32<<20)).Decode(&req); err != nil {
		writeError(w, 400, "BadRequestError", "Invalid JSON body: "+err.Error(), nil)
		return req, false
	}
	if req.Model != s.cfg.served && req.Model != s.cfg.model {
		param := "model"
		writeError(w, 404, "NotFoundError", fmt.Sprintf("The model `%s` does not exist.", req.Model), &param)
		return req, false
	}
	return req, true
}

func (s *Server) embeddings(w http.ResponseWriter, r *http.Request) {
	req, ok := s.decode(w, r)
	if !ok {
		return
	}
	var inputs []string
	var one string
	if json.Unmarshal(req.Input, &one) == nil {
		inputs = []string{one}
	} else if err := json.Unmarshal(req.Input, &inputs); err != nil || len(inputs) == 0 {
		param := "input"
		writeError(w, 400, "BadRequestError", "input must be a string or a non-empty list of strings", &param)
		return
	}
	if s.eng.deadErr() != nil {
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	resp := embeddings{ID: fmt.Sprintf("embd-%032x", s.seq.Add(1)), Object: "list", Created: time.Now().Unix(), Model: req.Model}
	n := 0
	for i, in := range inputs {
		n += countTokens(in)
		resp.Data = append(resp.Data, embedding{Index: i, Object: "embedding", Embedding: embed(in)})
	}
	resp.Usage = usage{PromptTokens: n, TotalTokens: n}
	writeJSON(w, 200, resp)
}

// embed is a deterministic unit vector: equal texts embed equally.
func embed(text string) []float32 {
	v := make([]float32, EmbeddingDim)
	x := hashString(text) | 1
	var norm float64
	for i := range v {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		f := float64(int64(x%2001)-1000) / 1000
		v[i] = float32(f)
		norm += f * f
	}
	scale := float32(1 / math.Sqrt(norm))
	for i := range v {
		v[i] *= scale
	}
	return v
}
