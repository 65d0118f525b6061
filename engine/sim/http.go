package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"mime"
	"net/http"
	"os"
	"reflect"
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
	// dp is the process's DP ranks (nil: the one engine eng); eng is then
	// the first of them.
	dp *dpRanks
	// nixl is the KV connector of a disaggregated engine (nil: none);
	// sgl is SGLang's disaggregation.
	nixl *nixl
	sgl  *sglDisagg
	// loras are the adapters registered with the API server (lora.go).
	loras *loras
}

// rankHeader pins a request to a DP rank (vLLM's X-data-parallel-rank).
const rankHeader = "X-data-parallel-rank"

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
	if s.cfg.lora.runtime && s.cfg.flavor == "" {
		mux.HandleFunc("POST /v1/load_lora_adapter", s.loadLoRA)
		mux.HandleFunc("POST /v1/unload_lora_adapter", s.unloadLoRA)
	}
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, 200, map[string]string{"version": simVersion})
	})
	mux.HandleFunc("GET /load", func(w http.ResponseWriter, _ *http.Request) {
		r, q := s.queueLens()
		writeJSON(w, 200, map[string]int{"server_load": r + q})
	})
	mux.HandleFunc("POST /tokenize", s.tokenize)
	if s.cfg.flavor == "sglang" {
		mux.HandleFunc("POST /v1/tokenize", s.tokenize) // SGLang serves both
	}
	if os.Getenv("VLLM_SERVER_DEV_MODE") == "1" {
		// vLLM's development endpoints: drop every cached block nobody
		// holds, publishing AllBlocksCleared.
		mux.HandleFunc("POST /reset_prefix_cache", func(w http.ResponseWriter, _ *http.Request) {
			s.engines((*Engine).resetPrefixCache)
			w.WriteHeader(200)
		})
	}
	mux.HandleFunc("POST /detokenize", s.detokenize)
	mux.HandleFunc("POST /v1/responses", s.responses)
	for _, p := range []string{"/score", "/v1/score"} {
		mux.HandleFunc("POST "+p, s.score)
	}
	for _, p := range []string{"/rerank", "/v1/rerank", "/v2/rerank"} {
		mux.HandleFunc("POST "+p, s.rerank)
	}
	mux.HandleFunc("POST /pooling", s.pooling)
	mux.HandleFunc("POST /classify", s.classify)
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
	if s.deadErr() != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) models(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, 200, map[string]any{"object": "list", "data": append([]any{map[string]any{
		"id": s.cfg.served, "object": "model", "created": s.created, "owned_by": s.owner(), "root": s.cfg.model,
		"parent": nil, "max_model_len": s.cfg.maxModelLen,
		"permission": []any{map[string]any{"id": "modelperm-" + strconv.FormatInt(s.created, 16), "object": "model_permission",
			"created": s.created, "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
			"allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false, "organization": "*", "group": nil, "is_blocking": false}},
	}}, s.loraCards()...)})
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
		go s.engines(func(e *Engine) { e.kill(ErrEngineDead) })
	case "worker-dead":
		s.faults.workerDead = true
	case "hang":
		s.engines(func(e *Engine) {
			e.mu.Lock()
			e.stalled = true
			e.mu.Unlock()
		})
	case "slow":
		if f.Factor < 1 {
			writeError(w, 400, "BadRequestError", "slow needs factor >= 1", nil)
			return
		}
		s.engines(func(e *Engine) {
			e.mu.Lock()
			e.slow = f.Factor
			e.mu.Unlock()
		})
	case "errors":
		if f.Rate < 0 || f.Rate > 1 || (f.Code != 429 && f.Code != 500 && f.Code != 503) {
			writeError(w, 400, "BadRequestError", "errors needs rate in 0-1 and code 429, 500 or 503", nil)
			return
		}
		s.faults.errorRate, s.faults.errorCode = f.Rate, f.Code
	case "clear":
		s.faults.errorRate, s.faults.workerDead = 0, false
		s.engines(func(e *Engine) {
			e.mu.Lock()
			e.stalled, e.slow = false, 1
			e.mu.Unlock()
		})
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
	IgnoreEOS bool `json:"ignore_eos"`
	// KVTransferParams drive prefill/decode disaggregation (nixl.go); the
	// bootstrap fields SGLang's (sgldisagg.go).
	KVTransferParams *kvTransferParams `json:"kv_transfer_params"`
	BootstrapHost    string            `json:"bootstrap_host"`
	BootstrapPort    int               `json:"bootstrap_port"`
	BootstrapRoom    *uint64           `json:"bootstrap_room"`
	Input            json.RawMessage   `json:"input"`
	Stop             json.RawMessage   `json:"stop"`
	Seed             *int64            `json:"seed"`
	N                *int              `json:"n"`

	Temperature    *float64        `json:"temperature"`
	Logprobs       json.RawMessage `json:"logprobs"` // chat: bool; completions: int
	TopLogprobs    *int            `json:"top_logprobs"`
	Echo           bool            `json:"echo"`
	Tools          []toolDef       `json:"tools"`
	ToolChoice     json.RawMessage `json:"tool_choice"`
	ResponseFormat *struct {
		Type       string `json:"type"`
		JSONSchema *struct {
			Name   string         `json:"name"`
			Schema map[string]any `json:"schema"`
		} `json:"json_schema"`
	} `json:"response_format"`
	streamSet bool // "stream" was in the body
}

type toolDef struct {
	Type     string `json:"type"`
	Function struct {
		Name       string         `json:"name"`
		Parameters map[string]any `json:"parameters"`
	} `json:"function"`
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

// tokenize is vLLM's /tokenize: a completion prompt, or chat messages
// through the chat template, as the engine will see them.
func (s *Server) tokenize(w http.ResponseWriter, r *http.Request) {
	if s.cfg.flavor == "sglang" {
		s.tokenizeSGLang(w, r)
		return
	}
	var req struct {
		Prompt   *string       `json:"prompt"`
		Messages []chatMessage `json:"messages"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, 400, "BadRequestError", "Invalid JSON body: "+err.Error(), nil)
		return
	}
	var text string
	switch {
	case req.Prompt != nil && req.Messages == nil:
		text = *req.Prompt
	case req.Prompt == nil && req.Messages != nil:
		t, err := chatTemplate(req.Messages)
		if err != nil {
			writeError(w, 400, "BadRequestError", "messages: "+err.Error(), nil)
			return
		}
		text = t
	default:
		writeError(w, 400, "BadRequestError", "1 validation error: give either prompt or messages", nil)
		return
	}
	toks := tokenIDs(text)
	writeJSON(w, 200, map[string]any{"count": len(toks), "max_model_len": s.cfg.maxModelLen, "tokens": toks, "token_strs": nil})
}

// tokenizeSGLang is SGLang's /tokenize: a prompt, or a list of them, and no
// chat messages (its TokenizeRequest has no such field).
func (s *Server) tokenizeSGLang(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Prompt json.RawMessage `json:"prompt"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, 400, "BadRequestError", "Invalid JSON body: "+err.Error(), nil)
		return
	}
	var one string
	var many []string
	switch {
	case len(req.Prompt) == 0:
		writeError(w, 400, "BadRequestError", "1 validation error for TokenizeRequest\nprompt\n  Field required", nil)
	case json.Unmarshal(req.Prompt, &one) == nil:
		toks := tokenIDs(one)
		writeJSON(w, 200, map[string]any{"tokens": toks, "count": len(toks), "max_model_len": s.cfg.maxModelLen})
	case json.Unmarshal(req.Prompt, &many) == nil:
		all, counts := make([][]uint32, len(many)), make([]int, len(many))
		for i, p := range many {
			all[i] = tokenIDs(p)
			counts[i] = len(all[i])
		}
		writeJSON(w, 200, map[string]any{"tokens": all, "count": counts, "max_model_len": s.cfg.maxModelLen})
	default:
		writeError(w, 400, "BadRequestError", "Invalid prompt type. Expected str or List[str].", nil)
	}
}

// chatTemplate renders messages as the simulated model's chat template does:
// a role marker and the text of each.
func chatTemplate(ms []chatMessage) (string, error) {
	var b strings.Builder
	for _, m := range ms {
		t, err := contentText(m.Content)
		if err != nil {
			return "", err
		}
		b.WriteString("<|" + m.Role + "|>" + t + "\n")
	}
	return b.String(), nil
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
	b, ok := s.body(w, r)
	if !ok {
		return req, false
	}
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, 400, "BadRequestError", validationMessage(err), nil)
		return req, false
	}
	var keys map[string]json.RawMessage
	_ = json.Unmarshal(b, &keys)
	_, req.streamSet = keys["stream"]
	if req.Model != s.cfg.served && req.Model != s.cfg.model && !s.loras.has(req.Model) {
		param := "model"
		writeError(w, 404, "NotFoundError", fmt.Sprintf("The model `%s` does not exist.", req.Model), &param)
		return req, false
	}
	return req, true
}

// body reads a JSON request body as FastAPI does for vLLM: a Content-Type
// other than application/json (or +json) is not parsed, and the request
// fails validation (vLLM answers 400 for every validation error).
func (s *Server) body(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || !(mt == "application/json" || (strings.HasPrefix(mt, "application/") && strings.HasSuffix(mt, "+json"))) {
			writeError(w, 400, "BadRequestError", "[{'type': 'model_attributes_type', 'loc': ('body',), 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': b'...'}]", nil)
			return nil, false
		}
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 32<<20))
	if err != nil {
		writeError(w, 400, "BadRequestError", "[{'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error', 'input': {}, 'ctx': {'error': 'could not read the body'}}]", nil)
		return nil, false
	}
	return b, true
}

// validationMessage words a JSON decoding error as pydantic does (vLLM's
// 400 message), never naming Go types.
func validationMessage(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		typ, msg := "type_error", "Input should be of a different type"
		switch te.Type.Kind() {
		case reflect.Int, reflect.Int32, reflect.Int64:
			typ, msg = "int_type", "Input should be a valid integer"
		case reflect.Float32, reflect.Float64:
			typ, msg = "float_type", "Input should be a valid number"
		case reflect.String:
			typ, msg = "string_type", "Input should be a valid string"
		case reflect.Bool:
			typ, msg = "bool_type", "Input should be a valid boolean"
		case reflect.Slice:
			typ, msg = "list_type", "Input should be a valid list"
		case reflect.Struct, reflect.Map:
			typ, msg = "dict_type", "Input should be a valid dictionary"
		}
		loc := "('body',)"
		if te.Field != "" {
			loc = "('body', '" + strings.ReplaceAll(te.Field, ".", "', '") + "')"
		}
		return fmt.Sprintf("[{'type': '%s', 'loc': %s, 'msg': '%s', 'input': %s}]", typ, loc, msg, te.Value)
	}
	var se *json.SyntaxError
	off := int64(0)
	if errors.As(err, &se) {
		off = se.Offset
	}
	return fmt.Sprintf("[{'type': 'json_invalid', 'loc': ('body', %d), 'msg': 'JSON decode error', 'input': {}, 'ctx': {'error': 'Expecting value'}}]", off)
}

func (s *Server) embeddings(w http.ResponseWriter, r *http.Request) {
	if !s.cfg.pooling && s.cfg.flavor != "sglang" {
		writeError(w, 400, "BadRequestError", "The model does not support Embeddings API", nil)
		return
	}
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
	if s.deadErr() != nil {
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	resp := embeddings{ID: "embd-" + baseRequestID(r), Object: "list", Created: time.Now().Unix(), Model: req.Model}
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
