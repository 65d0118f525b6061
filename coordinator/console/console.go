package console

import (
	"bytes"
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

//go:embed static
var staticFS embed.FS

// Config is a console's configuration.
type Config struct {
	// API is the coordinator API the CLI uses.
	API coordv1.CoordinatorClient
	// Chat is the router's OpenAI handler the playground sends to (nil: no
	// router here, the playground says so).
	Chat http.Handler
	// Auth checks a request (cookieToken: the token it logged in with) and
	// names the caller; an error refuses it.
	Auth func(r *http.Request, cookieToken string) (string, error)
	// Secure marks the login cookie Secure (the console serves HTTPS).
	Secure bool
	// StaleHeader is the response header with which the API says a read
	// could not be confirmed current (a replicated coordinator without a
	// leader answers from its last state); the console passes it on as
	// X-Shoal-Stale and the page shows it.
	StaleHeader string
	// Every is how often load, pulls and health are sampled (2 s); Keep how
	// long the load series last (10 min).
	Every, Keep time.Duration
	// InventoryAge is how old a node's GPU inventory may grow before it is
	// read again (2 min); a change of the node's health reads it at once.
	InventoryAge time.Duration
	Now          func() time.Time
	Log          *slog.Logger
}

// Console serves the pages and their JSON.
type Console struct {
	cfg Config

	mu     sync.Mutex
	series map[string]*series          // guarded by mu; replica → load over time
	inv    map[string]*Inventory       // guarded by mu; node → GPU inventory
	pulls  map[string][]progressSample // guarded by mu; node → its pull's samples
	busy   map[string]bool             // guarded by mu; inventories being read
}

// cookieName holds the token a browser logged in with.
const cookieName = "shoal_console"

// New builds a console; Run samples, Handler serves.
func New(cfg Config) *Console {
	if cfg.Every == 0 {
		cfg.Every = 2 * time.Second
	}
	if cfg.Keep == 0 {
		cfg.Keep = 10 * time.Minute
	}
	if cfg.InventoryAge == 0 {
		cfg.InventoryAge = 2 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Console{cfg: cfg, series: map[string]*series{}, inv: map[string]*Inventory{}, pulls: map[string][]progressSample{}, busy: map[string]bool{}}
}

// apiTimeout bounds one API call of a page.
const apiTimeout = 10 * time.Second

// Handler is the console's HTTP handler.
func (c *Console) Handler() http.Handler {
	mux := http.NewServeMux()
	sub, _ := fs.Sub(staticFS, "static")
	files := http.FileServerFS(sub)
	mux.Handle("GET /static/", http.StripPrefix("/static/", files))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		b, _ := fs.ReadFile(sub, "index.html")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
		_, _ = w.Write(b)
	})
	mux.HandleFunc("POST /login", c.login)
	mux.HandleFunc("POST /logout", c.logout)
	mux.HandleFunc("GET /api/whoami", c.authed(c.whoami))
	mux.HandleFunc("GET /api/cluster", c.authed(c.cluster))
	mux.HandleFunc("GET /api/nodes/{id}", c.authed(c.node))
	mux.HandleFunc("GET /api/deployments", c.authed(c.deployments))
	mux.HandleFunc("GET /api/deployments/{name}", c.authed(c.deployment))
	mux.HandleFunc("GET /api/replicas/{id}", c.authed(c.replica))
	mux.HandleFunc("GET /api/replicas/{id}/logs", c.authed(c.logs))
	mux.HandleFunc("GET /api/models", c.authed(c.models))
	mux.HandleFunc("POST /api/chat", c.authed(c.chat))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no such page: %s %s (the console serves /, /api/cluster, /api/deployments, /api/replicas/ID, …)", r.Method, r.URL.Path))
	})
	return headers(mux)
}

// headers are every answer's: no framing, no sniffing, scripts and styles
// only from the console itself.
func headers(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

func writeErr(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// apiErr answers an API failure with its status.
func apiErr(w http.ResponseWriter, err error) {
	st, _ := status.FromError(err)
	code := http.StatusBadGateway
	switch st.Code() {
	case codes.NotFound:
		code = http.StatusNotFound
	case codes.InvalidArgument:
		code = http.StatusBadRequest
	case codes.Unavailable, codes.DeadlineExceeded:
		code = http.StatusServiceUnavailable
	}
	writeErr(w, code, st.Message())
}

// sameOrigin refuses a state-changing request a browser sent from another
// site: it must carry the console's header (a cross-site form cannot) and,
// when the browser names an Origin, this one.
func sameOrigin(r *http.Request) error {
	if r.Header.Get("X-Shoal-Console") != "1" {
		return errors.New("missing X-Shoal-Console: 1 (the console's pages send it; a cross-site form cannot)")
	}
	if o := r.Header.Get("Origin"); o != "" {
		u, err := url.Parse(o)
		if err != nil || u.Host != r.Host {
			return fmt.Errorf("origin %q is not this console's (%s)", o, r.Host)
		}
	}
	return nil
}

func cookieToken(r *http.Request) string {
	if ck, err := r.Cookie(cookieName); err == nil {
		return ck.Value
	}
	return ""
}

// authed refuses a request the coordinator's CLI auth refuses.
func (c *Console) authed(h func(http.ResponseWriter, *http.Request, string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		who, err := c.cfg.Auth(r, cookieToken(r))
		if err != nil {
			writeErr(w, http.StatusUnauthorized, err.Error())
			return
		}
		if r.Method != http.MethodGet {
			if err := sameOrigin(r); err != nil {
				writeErr(w, http.StatusForbidden, err.Error())
				return
			}
		}
		r, note := withStale(r)
		h(&staleWriter{ResponseWriter: w, note: note}, r, who)
	}
}

// staleWriter marks an answer X-Shoal-Stale when one of its reads was.
type staleWriter struct {
	http.ResponseWriter
	note *staleNote
	done bool
}

func (s *staleWriter) WriteHeader(code int) {
	if !s.done {
		s.done = true
		s.note.mu.Lock()
		if s.note.why != "" {
			s.Header().Set("X-Shoal-Stale", s.note.why)
		}
		s.note.mu.Unlock()
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *staleWriter) Write(b []byte) (int, error) {
	if !s.done {
		s.WriteHeader(http.StatusOK)
	}
	return s.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (s *staleWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Flush streams (the logs, the playground).
func (s *staleWriter) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// login takes a CLI token ({"token": "shoal_…"}), checks it as the API
// would, and keeps it in an HttpOnly cookie.
func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	if err := sameOrigin(r); err != nil {
		writeErr(w, http.StatusForbidden, err.Error())
		return
	}
	var in struct {
		Token string `json:"token"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&in); err != nil || in.Token == "" {
		writeErr(w, http.StatusBadRequest, `want {"token": "shoal_…"} (a CLI token: shoal tls token create NAME)`)
		return
	}
	r.Header.Del("Authorization")
	who, err := c.cfg.Auth(r, in.Token)
	if err != nil {
		writeErr(w, http.StatusUnauthorized, err.Error())
		return
	}
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: in.Token, Path: "/", HttpOnly: true, Secure: c.cfg.Secure,
		SameSite: http.SameSiteStrictMode, MaxAge: int((12 * time.Hour).Seconds())})
	writeJSON(w, r, map[string]string{"name": who})
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request) {
	if err := sameOrigin(r); err != nil {
		writeErr(w, http.StatusForbidden, err.Error())
		return
	}
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/", HttpOnly: true, Secure: c.cfg.Secure, SameSite: http.SameSiteStrictMode, MaxAge: -1})
	w.WriteHeader(http.StatusNoContent)
}

// writeJSON answers v with an ETag: a page that polls gets 304 while the
// view is unchanged.
func writeJSON(w http.ResponseWriter, r *http.Request, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err.Error())
		return
	}
	sum := sha256.Sum256(b)
	tag := `"` + hex.EncodeToString(sum[:12]) + `"`
	w.Header().Set("ETag", tag)
	w.Header().Set("Cache-Control", "no-cache")
	if r.Header.Get("If-None-Match") == tag {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

func (c *Console) whoami(w http.ResponseWriter, r *http.Request, who string) {
	writeJSON(w, r, map[string]any{"name": who, "playground": c.cfg.Chat != nil})
}

// staleKey carries a request's stale note through its API calls.
type staleKey struct{}

// staleNote is why a request's reads were not confirmed current ("" when
// they were).
type staleNote struct {
	mu  sync.Mutex
	why string
}

// withStale gives a request a stale note its reads fill.
func withStale(r *http.Request) (*http.Request, *staleNote) {
	n := &staleNote{}
	return r.WithContext(context.WithValue(r.Context(), staleKey{}, n)), n
}

// readOpts are the options of a read: its response header is checked for
// the API's stale mark.
func (c *Console) readOpts(ctx context.Context) (opts []grpc.CallOption, done func()) {
	n, _ := ctx.Value(staleKey{}).(*staleNote)
	if n == nil || c.cfg.StaleHeader == "" {
		return nil, func() {}
	}
	md := new(metadata.MD)
	return []grpc.CallOption{grpc.Header(md)}, func() {
		if v := md.Get(c.cfg.StaleHeader); len(v) > 0 {
			n.mu.Lock()
			n.why = v[0]
			n.mu.Unlock()
		}
	}
}

// snapshot reads the nodes and replicas from the API.
func (c *Console) snapshot(ctx context.Context) ([]*coordv1.NodeInfo, []*coordv1.ReplicaInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	opts, done := c.readOpts(ctx)
	ns, err := c.cfg.API.ListNodes(ctx, &coordv1.ListNodesRequest{}, opts...)
	done()
	if err != nil {
		return nil, nil, err
	}
	opts, done = c.readOpts(ctx)
	defer done()
	rs, err := c.cfg.API.ListReplicas(ctx, &coordv1.ListReplicasRequest{}, opts...)
	if err != nil {
		return nil, nil, err
	}
	return ns.Nodes, rs.Replicas, nil
}

func (c *Console) cluster(w http.ResponseWriter, r *http.Request, _ string) {
	f := Filter{Deployment: r.URL.Query().Get("deployment"), Health: r.URL.Query().Get("health")}
	if err := checkFilter(f); err != nil {
		writeErr(w, http.StatusBadRequest, err.Error())
		return
	}
	nodes, reps, err := c.snapshot(r.Context())
	if err != nil {
		apiErr(w, err)
		return
	}
	writeJSON(w, r, buildCluster(nodes, reps, c.inventories(), f))
}

// inventories is a copy of the inventories read so far.
func (c *Console) inventories() map[string]*Inventory {
	c.mu.Lock()
	defer c.mu.Unlock()
	inv := make(map[string]*Inventory, len(c.inv))
	for k, v := range c.inv {
		inv[k] = v
	}
	return inv
}

// node is one node with its whole inventory, read now.
func (c *Console) node(w http.ResponseWriter, r *http.Request, _ string) {
	ctx, cancel := context.WithTimeout(r.Context(), apiTimeout)
	defer cancel()
	resp, err := c.cfg.API.DescribeNode(ctx, &coordv1.DescribeNodeRequest{NodeId: r.PathValue("id")})
	if err != nil {
		apiErr(w, err)
		return
	}
	in := inventoryOf(resp.InventoryJson)
	in.Healthy, in.At = resp.Node.Healthy, c.cfg.Now()
	c.mu.Lock()
	c.inv[resp.Node.NodeId] = in
	c.mu.Unlock()
	writeJSON(w, r, nodeOf(resp.Node, in))
}

func (c *Console) describe(ctx context.Context, name string, nodes []*coordv1.NodeInfo, pulls map[string][]progressSample) (Deployment, error) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	opts, done := c.readOpts(ctx)
	d, err := c.cfg.API.DescribeDeployment(ctx, &coordv1.DescribeDeploymentRequest{Name: name}, opts...)
	done()
	if err != nil {
		return Deployment{}, err
	}
	return buildDeployment(d, nodes, pulls), nil
}

// pullSamples is a copy of the pulls' samples so far.
func (c *Console) pullSamples() map[string][]progressSample {
	c.mu.Lock()
	defer c.mu.Unlock()
	pulls := make(map[string][]progressSample, len(c.pulls))
	for k, v := range c.pulls {
		pulls[k] = v
	}
	return pulls
}

func (c *Console) listNodes(ctx context.Context) ([]*coordv1.NodeInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	opts, done := c.readOpts(ctx)
	defer done()
	ns, err := c.cfg.API.ListNodes(ctx, &coordv1.ListNodesRequest{}, opts...)
	if err != nil {
		return nil, err
	}
	return ns.Nodes, nil
}

func (c *Console) deployments(w http.ResponseWriter, r *http.Request, _ string) {
	ctx, cancel := context.WithTimeout(r.Context(), apiTimeout)
	defer cancel()
	opts, done := c.readOpts(ctx)
	ls, err := c.cfg.API.ListDeployments(ctx, &coordv1.ListDeploymentsRequest{}, opts...)
	done()
	if err != nil {
		apiErr(w, err)
		return
	}
	nodes, err := c.listNodes(r.Context())
	if err != nil {
		apiErr(w, err)
		return
	}
	out := []Deployment{}
	pulls := c.pullSamples()
	for _, s := range ls.Deployments {
		d, err := c.describe(r.Context(), s.Name, nodes, pulls)
		if status.Code(err) == codes.NotFound {
			continue // deleted between the two calls
		}
		if err != nil {
			apiErr(w, err)
			return
		}
		out = append(out, d)
	}
	writeJSON(w, r, out)
}

func (c *Console) deployment(w http.ResponseWriter, r *http.Request, _ string) {
	nodes, err := c.listNodes(r.Context())
	if err != nil {
		apiErr(w, err)
		return
	}
	d, err := c.describe(r.Context(), r.PathValue("name"), nodes, c.pullSamples())
	if err != nil {
		apiErr(w, err)
		return
	}
	writeJSON(w, r, d)
}

// ReplicaView is GET /api/replicas/{id}: the replica, its members, and its
// load over the last minutes.
type ReplicaView struct {
	Replica
	Series []Sample `json:"series"`
	// EverySeconds is the series' sampling interval.
	EverySeconds float64 `json:"everySeconds"`
}

func (c *Console) replica(w http.ResponseWriter, r *http.Request, _ string) {
	id := r.PathValue("id")
	nodes, reps, err := c.snapshot(r.Context())
	if err != nil {
		apiErr(w, err)
		return
	}
	for _, ri := range reps {
		if ri.GroupId != id || id == "" {
			continue
		}
		v := buildCluster(nodes, []*coordv1.ReplicaInfo{ri}, c.inventories(), Filter{})
		out := ReplicaView{Replica: v.Replicas[0], Series: []Sample{}, EverySeconds: c.cfg.Every.Seconds()}
		c.mu.Lock()
		if s := c.series[id]; s != nil {
			out.Series = s.list()
		}
		c.mu.Unlock()
		writeJSON(w, r, out)
		return
	}
	writeErr(w, http.StatusNotFound, fmt.Sprintf("replica %q: not found (the cluster view lists the replicas)", id))
}

// maxTail bounds the bytes of each log a page asks for first.
const maxTail = 1 << 20

// logs streams a member's engine logs as server-sent events (one "log"
// event per chunk: {"node","name","text"}; "end" when the logs end, "error"
// with the reason when they cannot be read).
func (c *Console) logs(w http.ResponseWriter, r *http.Request, _ string) {
	q := r.URL.Query()
	tail := int64(64 << 10)
	if s := q.Get("tail"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 || n > maxTail {
			writeErr(w, http.StatusBadRequest, fmt.Sprintf("tail=%q: give bytes, 0 to %d", s, maxTail))
			return
		}
		tail = n
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		writeErr(w, http.StatusInternalServerError, "this connection cannot stream")
		return
	}
	st, err := c.cfg.API.Logs(r.Context(), &coordv1.LogsRequest{Replica: r.PathValue("id"), NodeId: q.Get("node"), Name: q.Get("name"),
		Follow: q.Get("follow") == "1", TailBytes: tail})
	if err != nil {
		apiErr(w, err)
		return
	}
	// The first message says whether the replica and member exist.
	first, err := st.Recv()
	if err != nil && !errors.Is(err, io.EOF) {
		apiErr(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	send := func(event string, v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b)
		fl.Flush()
	}
	for ch := first; ch != nil; {
		send("log", map[string]string{"node": ch.NodeId, "name": ch.Name, "text": strings.ToValidUTF8(string(ch.Data), "\uFFFD")})
		if ch, err = st.Recv(); err != nil {
			break
		}
	}
	switch {
	case err == nil || errors.Is(err, io.EOF):
		send("end", map[string]string{})
	case r.Context().Err() != nil:
	default:
		send("fail", map[string]string{"error": status.Convert(err).Message()})
	}
}

// models is the router's GET /v1/models: what the playground can talk to.
func (c *Console) models(w http.ResponseWriter, r *http.Request, _ string) {
	if c.cfg.Chat == nil {
		writeErr(w, http.StatusNotFound, "this coordinator runs no router (--router): the playground sends through the built-in router")
		return
	}
	c.toRouter(w, r, http.MethodGet, "/v1/models")
}

// chat sends an OpenAI chat request through the router, as a client would;
// the router's API key, if it needs one, comes in X-Router-Key.
func (c *Console) chat(w http.ResponseWriter, r *http.Request, _ string) {
	if c.cfg.Chat == nil {
		writeErr(w, http.StatusNotFound, "this coordinator runs no router (--router): the playground sends through the built-in router")
		return
	}
	c.toRouter(w, r, http.MethodPost, "/v1/chat/completions")
}

// maxChatBody bounds a playground request.
const maxChatBody = 1 << 20

func (c *Console) toRouter(w http.ResponseWriter, r *http.Request, method, path string) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxChatBody+1))
	if err != nil {
		writeErr(w, http.StatusBadRequest, "reading the request: "+err.Error())
		return
	}
	if len(body) > maxChatBody {
		writeErr(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("a playground request is at most %d bytes", maxChatBody))
		return
	}
	req, err := http.NewRequestWithContext(r.Context(), method, path, bytes.NewReader(body))
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err.Error())
		return
	}
	req.RemoteAddr, req.Host = r.RemoteAddr, r.Host
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", r.Header.Get("Accept"))
	if k := r.Header.Get("X-Router-Key"); k != "" {
		req.Header.Set("Authorization", "Bearer "+k)
	}
	w.Header().Set("Cache-Control", "no-store")
	c.cfg.Chat.ServeHTTP(w, req)
}
