package router

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/shoalhq/shoal/coordinator/router/h1"
	"github.com/shoalhq/shoal/internal/kvhash"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/tidwall/gjson"
)

// Config tunes the router. The zero value works.
type Config struct {
	// APIKeys are the accepted Bearer keys (hashed), each with its models
	// and rate limit. Nil or empty: no authentication.
	APIKeys *Keys
	// Retries is how many more attempts a request gets, each at a replica
	// not yet tried, when one fails before any byte of its answer reached
	// the client: no connection, a reset before an answer, an answer that
	// breaks HTTP, a 5xx or a 429 (default 2; -1: none). Each answer says
	// how many it took (X-Shoal-Attempts).
	Retries int
	// EjectAfter gateway failures in a row (refused, reset, 5xx) eject a
	// backend for EjectFor times the number of its recent ejections
	// (outlier.go).
	EjectAfter int
	EjectFor   time.Duration
	// IdleTimeout ends a response when the backend sends nothing for this long
	// (a hung engine); TotalTimeout bounds a whole request (0: none, so long
	// reasoning streams are never cut).
	IdleTimeout  time.Duration
	TotalTimeout time.Duration
	// PrefixBytes of the prompt feed the prefix-cache strategies.
	PrefixBytes int
	// MaxBody bounds a request body.
	MaxBody int64
	// Registry receives the router's metrics (nil: a private one).
	Registry *prometheus.Registry
	// HoldFor keeps a request for a model with no ready replica this long,
	// waiting for one (scale from zero), before answering 503. At most
	// MaxHeld requests wait at once; OnDemand is told of each held model.
	HoldFor  time.Duration
	MaxHeld  int
	OnDemand func(model string)
	// CORS is the cross-origin policy (default: vLLM's, any origin).
	CORS CORS
	// KV is which replica holds which KV block, from the engines' own KV
	// events (the watcher's; nil: none, and prefix-cache estimates from
	// this router's history). TokenizeTimeout bounds the engine's
	// /tokenize call that names a prompt's blocks (default 500 ms; past it,
	// the estimate decides).
	KV              *KVIndex
	TokenizeTimeout time.Duration
	// KVIndexBlocks bounds KV (0: DefaultKVIndexBlocks).
	KVIndexBlocks int
	// Queues is the prefill queues this router shares with the others in
	// front of the same heads (Watcher.Queues; nil: none shared).
	Queues *Queues
	// Adapters asks a replica's head to load a LoRA adapter (nil: requests
	// for an adapter no replica holds get 503); AdapterRouting is
	// AdapterAffinity (default) or AdapterLeastRequest; AdapterLoadTimeout
	// bounds a request's wait for a load (default 2 minutes).
	Adapters           AdapterLoader
	AdapterRouting     string
	AdapterLoadTimeout time.Duration
	// HoldPrefillTokens: with prefix-cache, a request whose prompt no
	// replica has cached waits at the router while every replica has at
	// least this many of this router's prefill tokens not yet prefilled,
	// and goes, first come first served, to the first replica below it
	// (hold.go; default DefaultHoldPrefillTokens; -1: never waits).
	// HoldPrefillMax bounds the wait (default 30 s): past it the request is
	// routed as if there were room.
	HoldPrefillTokens int
	HoldPrefillMax    time.Duration
}

// DefaultHoldPrefillTokens is half of vLLM's default prefill chunk (8,192
// tokens a step): the level bench/routing measured best (docs/design/kv-events.md §4).
const DefaultHoldPrefillTokens = 4096

func (c *Config) defaults() {
	if c.Retries == 0 {
		c.Retries = 2
	}
	if c.Retries < 0 {
		c.Retries = 0
	}
	if c.EjectAfter <= 0 {
		c.EjectAfter = 5
	}
	if c.EjectFor == 0 {
		c.EjectFor = 5 * time.Second
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 10 * time.Minute
	}
	if c.PrefixBytes == 0 {
		c.PrefixBytes = DefaultPrefixBytes
	}
	if c.MaxBody == 0 {
		c.MaxBody = 64 << 20
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	c.CORS.defaults()
	if c.MaxHeld == 0 {
		c.MaxHeld = 1000
	}
	if c.TokenizeTimeout == 0 {
		c.TokenizeTimeout = 500 * time.Millisecond
	}
	if c.AdapterRouting == "" {
		c.AdapterRouting = AdapterAffinity
	}
	if c.AdapterLoadTimeout == 0 {
		c.AdapterLoadTimeout = DefaultAdapterLoadTimeout
	}
	if c.HoldPrefillTokens == 0 {
		c.HoldPrefillTokens = DefaultHoldPrefillTokens
	}
	if c.HoldPrefillTokens < 0 {
		c.HoldPrefillTokens = 0
	}
	if c.HoldPrefillMax <= 0 {
		c.HoldPrefillMax = 30 * time.Second
	}
}

// Router is the OpenAI-compatible HTTP front.
type Router struct {
	cfg    Config
	table  *Table
	log    *slog.Logger
	up     *h1.Client
	picker *picker
	held   atomic.Int64
	cards  cardCache

	requests  *prometheus.CounterVec
	fallback  *prometheus.CounterVec
	retries   *prometheus.CounterVec
	ejections *prometheus.CounterVec
	prefills  *prometheus.CounterVec
	ttfb      *prometheus.HistogramVec
	inflight  *prometheus.GaugeVec
	waiting   prometheus.Gauge         // requests waiting for a replica's prefill queue (hold.go)
	waits     *prometheus.HistogramVec // how long they waited, by how the wait ended

	tokenizeFailures prometheus.Counter
	tokRR            atomic.Uint64 // spreads /tokenize calls over replicas

	am     *adapterMetrics
	spread spreading
	bg     sync.WaitGroup // background adapter loads (Close waits)
	bgCtx  context.Context
	stopBg context.CancelFunc
}

// Close ends the router's background work (adapter loads it started to
// spread an adapter's traffic) and waits for it.
func (r *Router) Close() { r.stopBg(); r.bg.Wait() }

// New returns a router over table.
func New(table *Table, log *slog.Logger, cfg Config) *Router {
	cfg.defaults()
	r := &Router{cfg: cfg, table: table, log: log.With("component", "router"), up: h1.NewClient(), picker: newPickerWith(time.Now, mrand.Uint64(), cfg.KV, cfg.Queues),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_requests_total",
			Help: "Requests by model, strategy applied and status code."}, []string{"model", "strategy", "code"}),
		fallback: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_strategy_fallback_total",
			Help: "Picks where the asked strategy lacked its signal and least-request decided."}, []string{"strategy"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_retries_total",
			Help: "Requests retried on another replica, by the failed attempt's reason (connect, reset, bad_response, 5xx, 429)."}, []string{"reason"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_ejections_total",
			Help: "Backends ejected after consecutive gateway failures, by the last failure's reason."}, []string{"reason"}),
		prefills: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_prefill_hops_total",
			Help: "Prefill hops of disaggregated requests, by outcome (ok, failed: a refused connection or an error answer)."}, []string{"outcome"}),
		ttfb: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "shoal_router_upstream_first_byte_seconds",
			Help: "Time from routing to the engine's response headers.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 20)}, []string{"model"}),
	}
	r.inflight = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_router_inflight_requests",
		Help: "Requests being proxied to an engine now, by model."}, []string{"model"})
	r.waiting = prometheus.NewGauge(prometheus.GaugeOpts{Name: "shoal_router_waiting_requests",
		Help: "Prefix-cache requests waiting at the router because every replica has --hold-prefill-tokens of its prefill queued."})
	r.waits = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "shoal_router_wait_seconds",
		Help:    "How long requests waited at the router for a replica's prefill queue to shorten, by outcome (picked, timeout: --hold-prefill-max passed, canceled: the client left).",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 16)}, []string{"outcome"})
	r.picker.holdTokens = cfg.HoldPrefillTokens
	cfg.Registry.MustRegister(r.requests, r.fallback, r.retries, r.ejections, r.prefills, r.ttfb, r.inflight, r.waiting, r.waits)
	r.tokenizeFailures = prometheus.NewCounter(prometheus.CounterOpts{Name: "shoal_router_tokenize_failures_total",
		Help: "Prefix-cache picks whose prompt the engine could not tokenize in time (the router's estimate decided)."})
	cfg.Registry.MustRegister(r.tokenizeFailures)
	r.am = newAdapterMetrics(cfg.Registry)
	r.bgCtx, r.stopBg = context.WithCancel(context.Background())
	if cfg.KV != nil {
		cfg.KV.SetMax(cfg.KVIndexBlocks)
		registerKVIndexMetrics(cfg.Registry, cfg.KV)
	}
	if cfg.Queues != nil {
		registerQueueMetrics(cfg.Registry, cfg.Queues)
	}
	return r
}

// Handler routes the OpenAI endpoints.
func (r *Router) Handler() http.Handler {
	mux := http.NewServeMux()
	for _, p := range modelRoutes {
		mux.HandleFunc("POST "+p, r.proxy)
	}
	mux.HandleFunc("GET /v1/models", r.models)
	mux.HandleFunc("GET /v1/models/{id...}", r.model)
	mux.HandleFunc("GET /version", r.version)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) })
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) })
	mux.Handle("GET /metrics", promhttp.HandlerFor(r.cfg.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, 404, "invalid_request_error", "", "", fmt.Sprintf("Unknown request URL: %s %s. Supported: POST %s; GET /v1/models, /v1/models/{id}, /version.", req.Method, req.URL.Path, strings.Join(modelRoutes, ", ")))
	})
	return r.withCORS(mux)
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

// allowed checks a request's key: the models it may use (nil: any), or an
// error already written (401 unknown key, 429 over the key's rate).
func (r *Router) allowed(w http.ResponseWriter, req *http.Request) ([]string, bool) {
	if !r.cfg.APIKeys.enabled() {
		return nil, true
	}
	tok, found := strings.CutPrefix(hget(req.Header, "Authorization"), "Bearer ")
	var k *keyState
	if found && tok != "" {
		k = r.cfg.APIKeys.lookup(tok)
	}
	if k == nil {
		writeError(w, 401, "invalid_request_error", "", "invalid_api_key", "Incorrect API key provided. Pass it as `Authorization: Bearer KEY`.")
		return nil, false
	}
	if ok, wait := k.take(); !ok {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil(wait.Seconds())))))
		writeError(w, 429, "requests", "", "rate_limit_exceeded",
			fmt.Sprintf("Rate limit reached for key %s: %g requests/s (burst %d). Retry after %v.", k.Name, k.RPS, k.Burst, wait.Round(time.Millisecond)))
		return nil, false
	}
	return k.models(), true
}

// promptText flattens the prompt (or messages, or input) of a validated body
// for prefix hashing, reading no further than it needs.
func promptText(body []byte, limit int) string {
	var sb strings.Builder
	var add func(v gjson.Result)
	add = func(v gjson.Result) {
		switch {
		case v.Type == gjson.String:
			sb.WriteString(v.Str)
		case v.IsArray():
			v.ForEach(func(_, p gjson.Result) bool {
				if p.Type == gjson.String {
					sb.WriteString(p.Str)
				} else if t := p.Get("text"); t.Type == gjson.String {
					sb.WriteString(t.Str)
				}
				return sb.Len() < limit
			})
		}
	}
	// The results alias body only until this function returns: sb copies.
	r := gjson.GetMany(unsafe.String(unsafe.SliceData(body), len(body)), "prompt", "input", "messages")
	add(r[0])
	add(r[1])
	r[2].ForEach(func(_, m gjson.Result) bool {
		add(m.Get("content"))
		sb.WriteByte('\n')
		return sb.Len() < limit
	})
	return sb.String()
}

// fullCheckBytes is the body size up to which the router validates JSON in full.
const fullCheckBytes = 64 << 10

// looksLikeObject: the body starts with '{' and ends with '}' (outside spaces).
func looksLikeObject(b []byte) bool {
	b = bytes.TrimSpace(b)
	return len(b) >= 2 && b[0] == '{' && b[len(b)-1] == '}'
}

// bufs recycles the copy buffers of forward.
var bufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// requestID is unique per router process without a syscall per request: a
// random prefix drawn once, then a counter.
func requestID() string {
	var b [12]byte
	copy(b[:4], ridPrefix[:])
	binary.BigEndian.PutUint64(b[4:], ridSeq.Add(1))
	return hex.EncodeToString(b[:])
}

var (
	ridPrefix = func() (p [4]byte) { _, _ = rand.Read(p[:]); return }()
	ridSeq    atomic.Uint64
)

func (r *Router) proxy(w http.ResponseWriter, req *http.Request) {
	var bp *[]byte
	defer func() { h1.PutBuf(bp) }()
	aw, ok := w.(aborter)
	if !ok {
		aw = &abortWriter{ResponseWriter: w}
	}
	r.serve(aw, req, func() ([]byte, error) {
		var b []byte
		var err error
		b, bp, err = h1.ReadBody(http.MaxBytesReader(w, req.Body, r.cfg.MaxBody), req.ContentLength, r.cfg.MaxBody)
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			err = h1.ErrBodyTooLarge
		}
		return b, err
	})
	if a, ok := aw.(*abortWriter); ok && a.aborted {
		panic(http.ErrAbortHandler) // net/http closes the connection without ending the answer
	}
}

// aborter is a ResponseWriter that can end an answer as broken.
type aborter interface {
	http.ResponseWriter
	Abort()
}

// abortWriter gives a net/http ResponseWriter an Abort, carried out by
// proxy once the request's resources are released.
type abortWriter struct {
	http.ResponseWriter
	aborted bool
}

func (a *abortWriter) Abort() { a.aborted = true }
func (a *abortWriter) Flush() {
	if f, ok := a.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
func (a *abortWriter) Unwrap() http.ResponseWriter { return a.ResponseWriter }

// serve routes one request: through net/http (proxy) or the fast path of
// Server. The API key is checked before the body is read (readBody), so a
// keyless client cannot make the router hold its bodies.
func (r *Router) serve(w aborter, req *http.Request, readBody func() ([]byte, error)) {
	rid := hget(req.Header, "X-Request-Id")
	if rid == "" {
		rid = requestID()
	}
	w.Header()["X-Request-Id"] = []string{rid}
	r.cfg.CORS.simple(w, hget(req.Header, "Origin"))
	allow, ok := r.allowed(w, req)
	if !ok {
		return
	}
	body, err := readBody()
	if err != nil {
		if errors.Is(err, h1.ErrBodyTooLarge) {
			writeError(w, 413, "invalid_request_error", "", "", fmt.Sprintf("request body over the %d MiB limit", r.cfg.MaxBody>>20))
			return
		}
		writeError(w, 400, "invalid_request_error", "", "", "could not read the request body: "+err.Error())
		return
	}
	// gjson reads "model" without decoding the (possibly huge) prompt: the
	// router never materialises the body. Bodies up to fullCheckBytes are
	// validated in full (exact 400s, negligible cost); bigger ones get a
	// structural check and the engine, which parses them anyway, answers 400
	// for a malformed one. Full validation of a 200 KB prompt cost a quarter
	// of the router's CPU (BenchmarkProxy).
	if !looksLikeObject(body) || (len(body) <= fullCheckBytes && !gjson.ValidBytes(body)) {
		var v any
		msg := "invalid JSON"
		if err := json.Unmarshal(body, &v); err != nil {
			msg = err.Error()
		}
		writeError(w, 400, "invalid_request_error", "", "", "We could not parse the JSON body of your request: "+msg)
		return
	}
	mr := gjson.GetBytes(body, "model")
	if mr.Type != gjson.String || mr.Str == "" {
		writeError(w, 400, "invalid_request_error", "model", "", "you must provide a model parameter")
		return
	}
	model := mr.Str
	strategy := hget(req.Header, "Routing-Strategy")
	if strategy == "" {
		strategy = DefaultStrategy
	}
	if !validStrategy(strategy) {
		writeError(w, 400, "invalid_request_error", "", "", fmt.Sprintf("unknown routing-strategy %q; one of %s", strategy, strategyList()))
		return
	}
	snap := r.table.Load()
	eps, known := snap.Endpoints(model)
	base, bound, isAdapter := "", 0, false
	if !known {
		if base, bound, isAdapter = snap.Adapter(model); isAdapter {
			eps, known = snap.Endpoints(base)
		}
	}
	if !known || (allow != nil && !slices.Contains(allow, model) && !(isAdapter && slices.Contains(allow, base))) {
		writeError(w, 404, "invalid_request_error", "model", "model_not_found", fmt.Sprintf("The model `%s` does not exist or you do not have access to it.", model))
		return
	}
	if len(eps) == 0 && r.cfg.HoldFor > 0 {
		served := model
		if isAdapter {
			served = base // an adapter waits for its base model's replicas
		}
		eps = r.hold(req.Context(), served)
	}
	if isAdapter {
		var ea *errAdapter
		if eps, ea = r.adapterEndpoints(req.Context(), model, bound, eps); ea != nil {
			r.requests.WithLabelValues(model, strategy, strconv.Itoa(ea.status)).Inc()
			if ea.status == 404 {
				writeError(w, 404, "invalid_request_error", "model", "model_not_found", ea.msg)
				return
			}
			w.Header().Set("Retry-After", "5")
			writeError(w, ea.status, "server_error", "", "adapter_not_loaded", ea.msg)
			return
		}
	}
	h := hint{model: model, session: hget(req.Header, "X-Session-Id")}
	if strategy == StrategyPrefixCache || strategy == StrategyPrefixAIBrix {
		text := promptText(body, r.cfg.PrefixBytes)
		h.prefix = prefixHashes(text, r.cfg.PrefixBytes)
		h.keys = map[kvhash.Namer][]uint64{}
		if strategy == StrategyPrefixCache {
			if toks, ok := r.tokens(req.Context(), eps, req.URL.Path, body); ok {
				h.tokens, h.promptTokens = toks, len(toks)
				h.nameBlocks(r.cfg.KV, eps)
			} else {
				h.promptTokens = estimateTokens(promptText(body, math.MaxInt))
			}
		}
	}
	ctx := req.Context()
	if isAdapter {
		ctx = context.WithValue(ctx, adapterKey{}, model)
	}
	if r.cfg.TotalTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, r.cfg.TotalTimeout)
		defer cancel()
	}
	prefills, eps, pd := splitRoles(eps)
	if !pd && len(eps) > 0 && eps[0].SGLangPD && eps[0].Role == RoleDecode {
		// SGLang decode engines with no prefill engine ready: they cannot
		// take the request alone.
		r.prefillsExhausted(w, model, nil, nil)
		return
	}
	tried := map[string]bool{}
	reloaded := false           // an adapter gone from its replica was loaded again
	ptried := map[string]bool{} // SGLang: prefill engines tried
	var lastPrefill error
	var last, answered *attempt // the last failed attempt and the last engine answer among them; nothing of them written
	attempts, maxAttempts := 0, 1+retriesFor(eps, r.cfg.Retries)
	if stateful(req.URL.Path, body) {
		maxAttempts = 1 // it leaves state where it is answered: never sent twice
	}
	for attempts < maxAttempts {
		var ep *Endpoint
		var used string
		var lease *lease
		if attempts == 0 && !pd {
			// The replicas there are now, for a request that waits (only
			// prefix-cache waits; no closure for the others).
			var reload func() []*Endpoint
			if strategy == StrategyPrefixCache && !isAdapter {
				reload = func() []*Endpoint {
					now, _ := r.table.Load().Endpoints(model)
					_, now, _ = splitRoles(now)
					return now
				}
			}
			ep, used, lease = r.pickWaiting(ctx, strategy, eps, h, tried, reload)
		} else {
			ep, used, lease = r.picker.pick(strategy, eps, h, tried)
		}
		if ep == nil && attempts == 0 && ctx.Err() != nil {
			if req.Context().Err() != nil {
				r.requests.WithLabelValues(model, strategy, "499").Inc() // the client left while it waited
				return
			}
			r.requests.WithLabelValues(model, strategy, "504").Inc()
			writeError(w, 504, "server_error", "", "timeout", fmt.Sprintf("The request waited past the router's total timeout (%v) for a replica with room.", r.cfg.TotalTimeout))
			return
		}
		if ep == nil {
			break
		}
		if last != nil {
			r.retries.WithLabelValues(last.reason).Inc()
			r.log.Warn("backend failed; trying another replica", "model", model, "backend", last.addr, "reason", last.reason, "err", last.err, "request_id", rid)
		}
		attempts++
		if used != strategy && strategy != StrategyPrefixAIBrix {
			r.fallback.WithLabelValues(strategy).Inc()
		}
		tried[ep.Addr] = true
		wh := w.Header()
		wh["X-Shoal-Attempts"] = []string{strconv.Itoa(attempts)}
		wh["X-Shoal-Strategy"] = []string{used}
		if h.session != "" {
			w.Header().Set("x-session-id", h.session)
		}
		// Another attempt may follow only if one is left and a replica not
		// yet tried is there to take it.
		canRetry := attempts < maxAttempts && untried(eps, tried)
		sent, fctx := body, ctx
		var hop *sglangHop
		if pd && prefills[0].BootstrapPort > 0 {
			// SGLang: the same body to a prefill and this decode engine at once.
			var err error
			if hop, err = r.sglangStart(ctx, req, prefills, body, rid, prefillStrategy(strategy), h, ptried); hop == nil {
				lease.release()
				r.prefillsExhausted(w, model, err, lastPrefill)
				return
			}
			sent, fctx = hop.body, hop.ctx
		} else if pd {
			// The first hop: a prefill engine computes the prompt's KV.
			db, fail := r.prefill(ctx, req, prefills, body, rid, prefillStrategy(strategy), h)
			switch {
			case fail == nil:
				sent = db
			case fail.status == 0 || fail.status >= 500 || fail.status == 429:
				// No prefill engine could take it: the decode engine (a
				// kv_both engine) serves it whole rather than fail it.
				r.prefills.WithLabelValues("fallback").Inc()
				r.log.Warn("no prefill engine took the request; the decode engine prefills it", "model", model, "err", fail.err, "request_id", rid)
			default:
				lease.release()
				r.prefillFailed(w, model, fail) // the request itself is refused (4xx)
				return
			}
		}
		g := r.inflight.WithLabelValues(model)
		g.Inc()
		first := lease.firstToken
		if hop != nil {
			first = func() { hop.started.Store(true); lease.firstToken() }
		}
		a := r.forward(fctx, w, req, ep, sent, canRetry || hop != nil, first)
		g.Dec()
		lease.release()
		if a.reason == reasonAdapterGone && !reloaded {
			// Evicted there since its head's last report: loaded again
			// where it was chosen, and tried once more.
			reloaded = true
			r.log.Info("adapter gone from a replica that held it; loading it again", "adapter", model, "replica", ep.Group, "request_id", rid)
			if err := r.loadAdapter(ctx, ep, model, "gone"); err == nil {
				delete(tried, ep.Addr)
				attempts--
				continue
			}
		}
		if hop != nil {
			if perr := r.sglangFinish(hop, a); perr != nil && !a.done {
				// The prefill engine failed before the decode engine
				// answered: not the decode engine's failure; another
				// prefill engine is tried with it.
				r.log.Warn("prefill failed; trying another prefill engine", "backend", hop.ep.Addr, "err", perr, "request_id", rid)
				lastPrefill = perr
				delete(tried, ep.Addr)
				attempts--
				continue
			}
		}
		if a.reason != "" || a.gatewayOK {
			if d := r.picker.outcome(ep.Addr, a.gatewayFailure(), r.cfg.EjectAfter, r.cfg.EjectFor); d > 0 {
				r.ejections.WithLabelValues(a.reason).Inc()
				r.log.Warn("backend ejected after consecutive failures", "model", model, "backend", ep.Addr, "for", d, "reason", a.reason)
			}
		}
		if a.done {
			r.requests.WithLabelValues(model, used, strconv.Itoa(a.status)).Inc()
			return
		}
		last = &a
		if a.status > 0 {
			answered = &a
		}
	}
	if answered != nil {
		last = answered // an engine's answer says more than a later refused connection
	}
	switch {
	case last == nil:
		r.requests.WithLabelValues(model, strategy, "503").Inc()
		w.Header().Set("Retry-After", "5")
		writeError(w, 503, "server_error", "", "no_ready_replica", fmt.Sprintf("No replica of `%s` is ready to serve; retry later (see `shoal get replicas`).", model))
	case last.status > 0:
		// Every attempt failed and the last one was an engine's answer: the
		// client gets that answer (its status, Retry-After and body), not
		// a made-up one.
		r.requests.WithLabelValues(model, strategy, strconv.Itoa(last.status)).Inc()
		last.writeTo(w)
	default:
		r.requests.WithLabelValues(model, strategy, "502").Inc()
		writeError(w, 502, "server_error", "", "upstream_unreachable", fmt.Sprintf("No replica of `%s` could be reached (%d attempts); the last failed: %v.", model, attempts, last.err))
	}
}

// retriesFor is the deployment's router.retries when its replicas carry one,
// else the router's.
func retriesFor(eps []*Endpoint, def int) int {
	for _, e := range eps {
		switch {
		case e.Retries > 0:
			return e.Retries
		case e.Retries < 0:
			return 0
		}
	}
	return def
}

// untried: a replica in eps has not been tried yet.
func untried(eps []*Endpoint, tried map[string]bool) bool {
	for _, e := range eps {
		if !tried[e.Addr] {
			return true
		}
	}
	return false
}

// attempt is how one try of a request at one replica ended.
type attempt struct {
	addr      string
	done      bool // the answer (or an error of the router's own) reached the client
	status    int  // the engine's status; 0 when it gave none
	reason    string
	err       error
	gatewayOK bool // the engine answered, not with a 5xx: its streak ends

	header []h1.Header // a failed answer's headers and body, to pass on if it is the last
	body   []byte
}

// Reasons an attempt failed and another may be made.
const (
	reasonConnect  = "connect"      // no connection to the engine
	reasonReset    = "reset"        // the connection broke before an answer
	reasonProtocol = "bad_response" // the answer broke HTTP/1.1
	reason5xx      = "5xx"
	reason429      = "429"
	// reasonAdapterGone: the engine answered 404 for an adapter the table
	// says it holds (evicted since its head last reported).
	reasonAdapterGone = "adapter_gone"
)

// gatewayFailure: the attempt counts toward ejecting its backend (a 429
// does not: the engine is full, not failing).
func (a *attempt) gatewayFailure() bool {
	return a.reason != "" && a.reason != reason429 && a.reason != reasonAdapterGone
}

// writeTo passes a failed engine answer on as the engine gave it.
func (a *attempt) writeTo(w http.ResponseWriter) {
	wh := w.Header()
	for _, kv := range a.header {
		switch kv.Key {
		case "Content-Type", "Retry-After":
			wh[kv.Key] = append(wh[kv.Key][:0], kv.Value)
		}
	}
	if len(a.body) == 0 || !json.Valid(a.body) {
		// Not JSON: an OpenAI-shaped error that quotes it.
		writeError(w, a.status, "server_error", "", "", fmt.Sprintf("The engine answered %d: %s", a.status, strings.TrimSpace(string(a.body))))
		return
	}
	wh["Content-Length"] = []string{strconv.Itoa(len(a.body))}
	w.WriteHeader(a.status)
	_, _ = w.Write(a.body)
}

// hold waits for a ready replica of model (the activator for scale from zero),
// bounded in time and in how many requests may wait.
func (r *Router) hold(ctx context.Context, model string) []*Endpoint {
	if r.held.Add(1) > int64(r.cfg.MaxHeld) {
		r.held.Add(-1)
		return nil
	}
	defer r.held.Add(-1)
	deadline := time.NewTimer(r.cfg.HoldFor)
	defer deadline.Stop()
	poke := time.NewTicker(time.Second)
	defer poke.Stop()
	for {
		if r.cfg.OnDemand != nil {
			r.cfg.OnDemand(model)
		}
		changed := r.table.Changed()
		if eps, _ := r.table.Load().Endpoints(model); len(eps) > 0 {
			return eps
		}
		select {
		case <-changed:
		case <-poke.C:
		case <-deadline.C:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

// maxFailedBody is how much of a failed (5xx, 429) answer is kept to pass
// on should it be the last.
const maxFailedBody = 64 << 10

// rankHeader pins a request to a DP rank at a server that fronts several
// (vLLM's data-parallel hybrid load balancing; engine.RankHeader).
const rankHeader = "X-data-parallel-rank"

// forward sends the request to ep and streams the answer back unbuffered. It
// returns done=false only when nothing was written and another replica may be
// tried: the connection failed or broke before an answer, the answer broke
// HTTP, or (when canRetry) the engine answered 5xx or 429.
//
// firstByte runs when the answer's body starts (the first token of a stream;
// the whole answer otherwise).
func (r *Router) forward(ctx context.Context, w aborter, req *http.Request, ep *Endpoint, body []byte, canRetry bool, firstByte func()) attempt {
	start := time.Now()
	var hb [7]h1.Header
	hdr := hb[:0]
	for _, hd := range passHeaders {
		if v := hget(req.Header, hd); v != "" {
			hdr = append(hdr, h1.Header{Key: hd, Value: v})
		}
	}
	if ep.PinRank {
		hdr = append(hdr, h1.Header{Key: rankHeader, Value: strconv.Itoa(ep.Rank)})
	}
	hdr = append(hdr, h1.Header{Key: "X-Request-Id", Value: w.Header()["X-Request-Id"][0]})
	// A hung engine sends nothing: every wait for it is bounded by IdleTimeout.
	resp, err := r.up.Do(ctx, ep.Addr, req.Method, req.URL.Path, hdr, body, r.cfg.IdleTimeout)
	if err != nil {
		if req.Context().Err() != nil {
			return attempt{addr: ep.Addr, done: true, status: 499, err: err} // the client went away
		}
		if errors.Is(err, context.DeadlineExceeded) {
			writeError(w, 504, "server_error", "", "timeout", fmt.Sprintf("The request ran past the router's total timeout (%v).", r.cfg.TotalTimeout))
			return attempt{addr: ep.Addr, done: true, status: 504, err: err}
		}
		a := attempt{addr: ep.Addr, reason: reasonReset, err: err}
		var pe *h1.ProtocolError
		var oe *net.OpError
		switch {
		case errors.As(err, &pe):
			a.reason = reasonProtocol
		case errors.As(err, &oe) && oe.Op == "dial":
			a.reason = reasonConnect
		}
		return a
	}
	defer resp.Close()
	r.ttfb.WithLabelValues(ep.Model).Observe(time.Since(start).Seconds())
	if resp.Status == 404 && ctx.Value(adapterKey{}) != nil {
		b, _ := io.ReadAll(io.LimitReader(resp, maxFailedBody))
		return attempt{addr: ep.Addr, status: 404, reason: reasonAdapterGone, header: slices.Clone(resp.Header), body: b,
			err: fmt.Errorf("engine no longer holds the adapter: %s", truncateBytes(bytes.TrimSpace(b), 200))}
	}
	if canRetry && (resp.Status >= 500 || resp.Status == 429) {
		b, _ := io.ReadAll(io.LimitReader(resp, maxFailedBody))
		a := attempt{addr: ep.Addr, status: resp.Status, reason: reason5xx, header: slices.Clone(resp.Header), body: b,
			err: fmt.Errorf("engine answered %d: %s", resp.Status, truncateBytes(bytes.TrimSpace(b), 200))}
		if resp.Status == 429 {
			a.reason = reason429
		}
		return a
	}
	wh := w.Header()
	for _, kv := range resp.Header {
		// Content-Length passes through for whole bodies (one write, no
		// chunked framing); hop-by-hop headers were dropped when read.
		if resp.SSE && kv.Key == "Content-Length" {
			continue
		}
		wh[kv.Key] = append(wh[kv.Key], kv.Value)
	}
	wh["X-Shoal-Replica"] = []string{ep.Group}
	wh["X-Shoal-Epoch"] = []string{strconv.FormatUint(ep.Epoch, 10)}
	wh["X-Shoal-Head"] = []string{ep.NodeID}
	wh["X-Shoal-Term"] = []string{strconv.FormatUint(ep.Term, 10)}
	w.WriteHeader(resp.Status)
	done := attempt{addr: ep.Addr, done: true, status: resp.Status, gatewayOK: resp.Status < 500}
	if resp.Status >= 500 {
		done.reason = reason5xx // passed on (no retry left) but still a failure of the backend
	}
	var fl http.Flusher
	if resp.SSE {
		fl, _ = w.(http.Flusher) // SSE: every event reaches the client as the engine emits it
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	buf := *bp
	var tail [2]byte // the last two bytes written: is the stream at an event's end?
	for {
		n, rerr := resp.Read(buf)
		if n > 0 {
			if n >= 2 {
				tail = [2]byte{buf[n-2], buf[n-1]}
			} else {
				tail = [2]byte{tail[1], buf[0]}
			}
			if firstByte != nil {
				firstByte()
				firstByte = nil
			}
			if _, werr := w.Write(buf[:n]); werr != nil {
				done.err = werr // client gone: closing the engine connection stops its request
				return done
			}
			if fl != nil {
				fl.Flush()
			}
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) {
				// A cut answer is never ended as if whole: the client's
				// connection closes without a final chunk or short of its
				// Content-Length, so it knows. A stream cut between events
				// first gets an error event, which OpenAI clients raise.
				if resp.SSE && tail == [2]byte{'\n', '\n'} && ctx.Err() == nil {
					_, _ = fmt.Fprintf(w, "data: {\"error\":{\"message\":%q,\"type\":\"server_error\",\"code\":502}}\n\n",
						fmt.Sprintf("the engine's stream broke after it began (%v); the answer is incomplete", rerr))
					if fl != nil {
						fl.Flush()
					}
				}
				w.Abort()
				done.err = rerr
				if ctx.Err() == nil {
					r.log.Warn("backend stream broke", "backend", ep.Addr, "err", rerr)
				}
			}
			return done
		}
	}
}

func truncateBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// hget is Header.Get for a key already in canonical form (net/http and the
// fast path store keys canonically): no canonicalisation per call.
func hget(h http.Header, canonicalKey string) string {
	if v := h[canonicalKey]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// passHeaders are the client's request headers an engine sees (canonical).
var passHeaders = [...]string{"Content-Type", "Accept", "Authorization", "Openai-Organization"}
