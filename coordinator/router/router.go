package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// maxBody bounds a request body (long prompts fit; runaway uploads do not).
const maxBody = 64 << 20

// Router is the OpenAI-compatible HTTP front.
type Router struct {
	table    *Table
	log      *slog.Logger
	client   *http.Client
	inflight *inflight
	// Retries is how many other replicas are tried when a backend cannot be
	// reached or answers 5xx before anything reached the client (safe: the
	// client has seen nothing, and a failed engine generated nothing usable).
	Retries int
	picked  atomic.Int64
}

// New returns a router over table.
func New(table *Table, log *slog.Logger) *Router {
	tr := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 0, // a long prefill may take minutes before headers
	}
	return &Router{table: table, log: log.With("component", "router"), client: &http.Client{Transport: tr},
		inflight: &inflight{m: map[string]*atomic.Int64{}}, Retries: 2}
}

// Handler routes the OpenAI endpoints.
func (r *Router) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", r.proxy)
	mux.HandleFunc("POST /v1/completions", r.proxy)
	mux.HandleFunc("POST /v1/embeddings", r.proxy)
	mux.HandleFunc("GET /v1/models", r.models)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) })
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, 404, "invalid_request_error", "", "", fmt.Sprintf("Unknown request URL: %s %s. Supported: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.", req.Method, req.URL.Path))
	})
	return mux
}

// writeError writes an OpenAI-shaped error.
func writeError(w http.ResponseWriter, status int, typ, param, code, msg string) {
	body := map[string]any{"message": msg, "type": typ, "param": nil, "code": nil}
	if param != "" {
		body["param"] = param
	}
	if code != "" {
		body["code"] = code
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": body})
}

func (r *Router) models(w http.ResponseWriter, _ *http.Request) {
	snap := r.table.Load()
	data := []any{}
	for _, m := range snap.Ready() {
		data = append(data, map[string]any{"id": m, "object": "model", "created": 0, "owned_by": "shoal"})
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
}

func (r *Router) proxy(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, req.Body, maxBody))
	if err != nil {
		writeError(w, 413, "invalid_request_error", "", "", fmt.Sprintf("request body over %d MiB or unreadable: %v", maxBody>>20, err))
		return
	}
	var head struct {
		Model *string `json:"model"`
	}
	if err := json.Unmarshal(body, &head); err != nil {
		writeError(w, 400, "invalid_request_error", "", "", "We could not parse the JSON body of your request: "+err.Error())
		return
	}
	if head.Model == nil || *head.Model == "" {
		writeError(w, 400, "invalid_request_error", "model", "", "you must provide a model parameter")
		return
	}
	model := *head.Model
	strategy := req.Header.Get("routing-strategy")
	if strategy == "" {
		strategy = DefaultStrategy
	}
	if !validStrategy(strategy) {
		writeError(w, 400, "invalid_request_error", "", "", fmt.Sprintf("unknown routing-strategy %q; one of %s", strategy, strategyList()))
		return
	}
	eps, known := r.table.Load().Endpoints(model)
	if !known {
		writeError(w, 404, "invalid_request_error", "model", "model_not_found", fmt.Sprintf("The model `%s` does not exist.", model))
		return
	}
	tried := map[string]bool{}
	for attempt := 0; attempt <= r.Retries; attempt++ {
		ep := r.pick(strategy, eps, tried)
		if ep == nil {
			break
		}
		tried[ep.Addr] = true
		done, err := r.forward(w, req, ep, body, attempt < r.Retries)
		if done {
			return
		}
		r.log.Warn("backend failed; trying another replica", "model", model, "backend", ep.Addr, "err", err)
	}
	w.Header().Set("Retry-After", "5")
	writeError(w, 503, "server_error", "", "no_ready_replica", fmt.Sprintf("No replica of `%s` is ready to serve; retry later (see `shoal get replicas`).", model))
}

// forward sends the request to ep and streams the answer back unbuffered. It
// returns done=false only when nothing was written and another replica may be
// tried: the connection failed, or (when canRetry) the engine answered 5xx.
func (r *Router) forward(w http.ResponseWriter, req *http.Request, ep *Endpoint, body []byte, canRetry bool) (bool, error) {
	c := r.inflight.counter(ep.Addr)
	c.Add(1)
	defer c.Add(-1)
	r.picked.Add(1)
	out, err := http.NewRequestWithContext(req.Context(), req.Method, "http://"+ep.Addr+req.URL.Path, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	for _, h := range []string{"Content-Type", "Accept", "Authorization", "X-Request-Id", "OpenAI-Organization"} {
		if v := req.Header.Get(h); v != "" {
			out.Header.Set(h, v)
		}
	}
	resp, err := r.client.Do(out)
	if err != nil {
		if req.Context().Err() != nil {
			return true, err // the client went away
		}
		return false, err
	}
	defer resp.Body.Close()
	if canRetry && resp.StatusCode >= 500 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return false, fmt.Errorf("engine answered %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	for k, vs := range resp.Header {
		if strings.EqualFold(k, "Content-Length") || strings.EqualFold(k, "Connection") {
			continue
		}
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	w.Header().Set("X-Shoal-Replica", ep.Group)
	w.Header().Set("X-Shoal-Epoch", strconv.FormatUint(ep.Epoch, 10))
	w.WriteHeader(resp.StatusCode)
	fl, _ := w.(http.Flusher)
	buf := make([]byte, 32<<10)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return true, werr
			}
			if fl != nil {
				fl.Flush() // SSE chunks reach the client as the engine emits them
			}
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) && !errors.Is(rerr, context.Canceled) {
				r.log.Warn("backend stream broke", "backend", ep.Addr, "err", rerr)
			}
			return true, nil
		}
	}
}
