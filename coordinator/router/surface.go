package router

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/coordinator/router/h1"
)

// The rest of the vLLM surface a client uses through the router: the
// engines' own model cards, the model-routed endpoints besides
// completions, /version, and CORS as vLLM configures it.

// modelRoutes are the POST endpoints routed by the body's "model", as the
// completions are: vLLM's generative and pooling APIs.
var modelRoutes = []string{
	"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
	"/tokenize", "/detokenize",
	"/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank", "/pooling", "/classify",
}

// stateful: the request leaves state on the engine that answers it (a stored
// Responses API answer): it is never sent twice.
func stateful(path string, body []byte) bool {
	if path != "/v1/responses" {
		return false
	}
	var v struct {
		Store *bool `json:"store"`
	}
	_ = json.Unmarshal(body, &v)
	return v.Store == nil || *v.Store // the Responses API stores by default
}

// cardTTL is how long an engine's /v1/models answer is reused.
const cardTTL = 5 * time.Second

type cardEntry struct {
	at    time.Time
	cards []map[string]any
}

// cardCache holds the engines' model cards by engine address.
type cardCache struct {
	mu sync.Mutex
	by map[string]cardEntry
}

// engineCards returns the model cards of every ready model, merged across
// replicas (the first replica's card of an id wins; adapters, whose parent
// is the model, come with it). A model whose engine could not be asked gets
// a card with what the router knows.
func (r *Router) engineCards(ctx context.Context, auth string) []map[string]any {
	snap := r.table.Load()
	models := snap.Ready()
	got := make([][]map[string]any, len(models))
	var wg sync.WaitGroup
	for i, m := range models {
		eps, _ := snap.Endpoints(m)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, ep := range eps[:min(len(eps), 2)] {
				if cs, ok := r.cardsOf(ctx, ep.Addr, auth); ok {
					for _, c := range cs {
						if c["id"] == m || c["parent"] == m {
							got[i] = append(got[i], c)
						}
					}
					if len(got[i]) > 0 {
						return
					}
				}
			}
			got[i] = []map[string]any{{"id": m, "object": "model", "created": 0, "owned_by": "shoal", "root": m, "parent": nil}}
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	var out []map[string]any
	ads := snap.Adapters()
	managed := map[string]bool{} // models whose adapters shoal manages
	for _, m := range models {
		eps, _ := snap.Endpoints(m)
		for _, e := range eps {
			managed[m] = managed[m] || e.AdapterSlots > 0
		}
	}
	for _, cs := range got {
		for _, c := range cs {
			id, _ := c["id"].(string)
			parent, _ := c["parent"].(string)
			if _, isAdapter := ads[id]; !isAdapter && managed[parent] {
				continue // an adapter the deployment no longer has (being unloaded)
			}
			if !seen[id] {
				seen[id] = true
				out = append(out, c)
			}
		}
	}
	return append(out, r.adapterCards(seen)...)
}

// cardsOf asks one engine for its /v1/models (cached for cardTTL).
func (r *Router) cardsOf(ctx context.Context, addr, auth string) ([]map[string]any, bool) {
	r.cards.mu.Lock()
	e, ok := r.cards.by[addr]
	r.cards.mu.Unlock()
	if ok && time.Since(e.at) < cardTTL {
		return e.cards, true
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	status, _, b, err := r.get(ctx, addr, "/v1/models", auth)
	if err != nil || status != 200 {
		return nil, false
	}
	var list struct {
		Data []map[string]any `json:"data"`
	}
	if json.Unmarshal(b, &list) != nil {
		return nil, false
	}
	r.cards.mu.Lock()
	if r.cards.by == nil {
		r.cards.by = map[string]cardEntry{}
	}
	if len(r.cards.by) > 4096 {
		clear(r.cards.by)
	}
	r.cards.by[addr] = cardEntry{at: time.Now(), cards: list.Data}
	r.cards.mu.Unlock()
	return list.Data, true
}

// get sends a GET to an engine and reads its whole answer (at most 4 MiB).
func (r *Router) get(ctx context.Context, addr, path, auth string) (int, []h1.Header, []byte, error) {
	var hdr []h1.Header
	if auth != "" {
		hdr = []h1.Header{{Key: "Authorization", Value: auth}}
	}
	resp, err := r.up.Do(ctx, addr, http.MethodGet, path, hdr, nil, 10*time.Second)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Close()
	b, err := io.ReadAll(io.LimitReader(resp, 4<<20))
	return resp.Status, resp.Header, b, err
}

// visible: a card the key may see (its id or its parent among the key's models).
func visible(c map[string]any, allow []string) bool {
	if allow == nil {
		return true
	}
	id, _ := c["id"].(string)
	parent, _ := c["parent"].(string)
	return slices.Contains(allow, id) || (parent != "" && slices.Contains(allow, parent))
}

func (r *Router) models(w http.ResponseWriter, req *http.Request) {
	allow, ok := r.allowed(w, req)
	if !ok {
		return
	}
	data := []map[string]any{}
	for _, c := range r.engineCards(req.Context(), hget(req.Header, "Authorization")) {
		if visible(c, allow) {
			data = append(data, c)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
}

// model answers GET /v1/models/{id} (ids may hold slashes: org/name).
func (r *Router) model(w http.ResponseWriter, req *http.Request) {
	allow, ok := r.allowed(w, req)
	if !ok {
		return
	}
	id := req.PathValue("id")
	for _, c := range r.engineCards(req.Context(), hget(req.Header, "Authorization")) {
		if c["id"] == id && visible(c, allow) {
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(c)
			return
		}
	}
	writeError(w, 404, "NotFoundError", "model", "model_not_found", fmt.Sprintf("The model `%s` does not exist.", id))
}

// version answers GET /version from a ready engine (vLLM's version).
func (r *Router) version(w http.ResponseWriter, req *http.Request) {
	snap := r.table.Load()
	for _, m := range snap.Ready() {
		eps, _ := snap.Endpoints(m)
		for _, ep := range eps {
			status, hdr, b, err := r.get(req.Context(), ep.Addr, "/version", hget(req.Header, "Authorization"))
			if err != nil {
				continue
			}
			for _, kv := range hdr {
				if kv.Key == "Content-Type" {
					w.Header().Set("Content-Type", kv.Value)
				}
			}
			w.Header().Set("X-Shoal-Replica", ep.Group)
			w.WriteHeader(status)
			_, _ = w.Write(b)
			return
		}
	}
	w.Header().Set("Retry-After", "5")
	writeError(w, 503, "server_error", "", "no_ready_replica", "No engine is ready to say its version; retry later (see `shoal get replicas`).")
}

// CORS is the router's cross-origin policy, vLLM's flags and defaults
// (--allowed-origins, --allowed-methods, --allowed-headers, each ["*"], and
// --allow-credentials false), answered as Starlette's CORSMiddleware, which
// vLLM uses, answers: a preflight gets 200 with the allowed method list and
// max age 600, or 400 naming what is disallowed.
type CORS struct {
	Origins, Methods, Headers []string
	Credentials               bool
}

func (c *CORS) defaults() {
	if len(c.Origins) == 0 {
		c.Origins = []string{"*"}
	}
	if len(c.Methods) == 0 {
		c.Methods = []string{"*"}
	}
	if len(c.Headers) == 0 {
		c.Headers = []string{"*"}
	}
}

var allMethods = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"

func (c *CORS) originOK(o string) bool {
	return slices.Contains(c.Origins, "*") || slices.Contains(c.Origins, o)
}

// simple adds the headers of an answer to a cross-origin request.
func (c *CORS) simple(w http.ResponseWriter, origin string) {
	if origin == "" || !c.originOK(origin) {
		return
	}
	h := w.Header()
	if slices.Contains(c.Origins, "*") && !c.Credentials {
		h["Access-Control-Allow-Origin"] = []string{"*"}
	} else {
		h["Access-Control-Allow-Origin"] = []string{origin}
		h["Vary"] = []string{"Origin"}
	}
	if c.Credentials {
		h["Access-Control-Allow-Credentials"] = []string{"true"}
	}
}

// preflight answers an OPTIONS preflight.
func (c *CORS) preflight(w http.ResponseWriter, req *http.Request) {
	origin := req.Header.Get("Origin")
	method := req.Header.Get("Access-Control-Request-Method")
	var bad []string
	if !c.originOK(origin) {
		bad = append(bad, "origin")
	}
	if !slices.Contains(c.Methods, "*") && !slices.Contains(c.Methods, method) {
		bad = append(bad, "method")
	}
	reqHeaders := req.Header.Get("Access-Control-Request-Headers")
	if !slices.Contains(c.Headers, "*") {
		for _, hn := range strings.Split(reqHeaders, ",") {
			hn = strings.TrimSpace(hn)
			if hn != "" && !slices.ContainsFunc(c.Headers, func(a string) bool { return strings.EqualFold(a, hn) }) {
				bad = append(bad, "headers")
				break
			}
		}
	}
	h := w.Header()
	methods := allMethods
	if !slices.Contains(c.Methods, "*") {
		methods = strings.Join(c.Methods, ", ")
	}
	h.Set("Access-Control-Allow-Methods", methods)
	h.Set("Access-Control-Max-Age", "600")
	if slices.Contains(c.Headers, "*") {
		if reqHeaders != "" {
			h.Set("Access-Control-Allow-Headers", reqHeaders)
		}
	} else {
		h.Set("Access-Control-Allow-Headers", strings.Join(c.Headers, ", "))
	}
	if len(bad) > 0 {
		h.Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(400)
		_, _ = io.WriteString(w, "Disallowed CORS "+strings.Join(bad, ", "))
		return
	}
	c.simple(w, origin)
	if slices.Contains(c.Origins, "*") && !c.Credentials {
		h.Del("Vary")
	} else {
		h.Set("Vary", "Origin")
	}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(2))
	w.WriteHeader(200)
	_, _ = io.WriteString(w, "OK")
}

// withCORS answers preflights and adds the CORS headers to every answer of
// h that has an Origin.
func (r *Router) withCORS(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		origin := req.Header.Get("Origin")
		if req.Method == http.MethodOptions && origin != "" && req.Header.Get("Access-Control-Request-Method") != "" {
			r.cfg.CORS.preflight(w, req)
			return
		}
		r.cfg.CORS.simple(w, origin)
		h.ServeHTTP(w, req)
	})
}
