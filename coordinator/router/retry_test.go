package router

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"google.golang.org/protobuf/proto"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// failing is an engine that answers every request with status, body and
// headers, counting requests.
func failing(t *testing.T, status int, body string, hdr ...string) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		for i := 0; i+1 < len(hdr); i += 2 {
			w.Header().Set(hdr[i], hdr[i+1])
		}
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}))
	t.Cleanup(s.Close)
	return s, &n
}

func routerOver(cfg Config, eps ...*Endpoint) *Router {
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, eps))
	return New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), cfg)
}

// TestErrorsTellTheTruth: when every attempt fails, the client gets the
// last engine's own answer (status, body, Retry-After), not a made-up 503;
// a 503 with Retry-After only when no replica is ready; 502 when replicas
// are there but none could be reached.
func TestErrorsTellTheTruth(t *testing.T) {
	e1, _ := failing(t, 500, `{"error":{"message":"EngineCore encountered an issue (1)","type":"InternalServerError","code":500}}`, "Content-Type", "application/json")
	e2, _ := failing(t, 500, `{"error":{"message":"EngineCore encountered an issue (2)","type":"InternalServerError","code":500}}`, "Content-Type", "application/json")
	r := routerOver(Config{}, &Endpoint{Model: "m", Addr: addr(e1), Group: "a"}, &Endpoint{Model: "m", Addr: addr(e2), Group: "b"})
	rec := do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 500, rec.Code)
	require.Contains(t, rec.Body.String(), "EngineCore encountered an issue")
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	require.Empty(t, rec.Header().Get("Retry-After"))
	require.Equal(t, "2", rec.Header().Get("X-Shoal-Attempts"))

	// Not JSON, the last attempt: streamed as the engine sent it.
	bad, _ := failing(t, 502, "upstream proxy exploded")
	r = routerOver(Config{Retries: -1}, &Endpoint{Model: "m", Addr: addr(bad)})
	rec = do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 502, rec.Code)
	require.Equal(t, "upstream proxy exploded", rec.Body.String())
	// Not JSON, kept from an earlier attempt when the next replica refused
	// the connection: an OpenAI-shaped error quoting it. (Round-robin over
	// addresses in order: the engine at 127.0.0.1 comes first.)
	r = routerOver(Config{}, &Endpoint{Model: "m", Addr: addr(bad), Group: "bad"}, &Endpoint{Model: "m", Addr: "127.0.0.9:1", Group: "dead"})
	for i := 0; i < 3; i++ {
		rec = do(t, r.Handler(), `{"model":"m"}`, map[string]string{"routing-strategy": "round-robin"})
		require.Equal(t, 502, rec.Code)
		require.Equal(t, "2", rec.Header().Get("X-Shoal-Attempts"))
		require.Equal(t, "The engine answered 502: upstream proxy exploded", errBody(t, rec)["message"])
	}

	// Replicas there, none reachable.
	r = routerOver(Config{}, &Endpoint{Model: "m", Addr: "127.0.0.1:1"}, &Endpoint{Model: "m", Addr: "127.0.0.1:2"})
	rec = do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 502, rec.Code)
	require.Equal(t, "upstream_unreachable", errBody(t, rec)["code"])
	require.Empty(t, rec.Header().Get("Retry-After"))

	// No replica ready.
	r = routerOver(Config{})
	rec = do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 503, rec.Code)
	require.Equal(t, "5", rec.Header().Get("Retry-After"))
}

// TestBusyReplicaIsRetried: a 429 from one replica goes to another with
// room; when all are full, the engine's 429 and Retry-After reach the client.
func TestBusyReplicaIsRetried(t *testing.T) {
	full, fullN := failing(t, 429, `{"error":{"message":"too many requests","type":"RateLimitError","code":429}}`, "Retry-After", "7", "Content-Type", "application/json")
	room := backend(t, "ok", 0)
	r := routerOver(Config{}, &Endpoint{Model: "m", Addr: addr(full), Group: "full"}, &Endpoint{Model: "m", Addr: addr(room), Group: "room"})
	for i := 0; i < 6; i++ { // round-robin: the full replica comes first every other request
		rec := do(t, r.Handler(), `{"model":"m"}`, map[string]string{"routing-strategy": "round-robin"})
		require.Equal(t, 200, rec.Code)
		require.Equal(t, "room", rec.Header().Get("X-Shoal-Replica"))
	}
	require.Positive(t, fullN.Load(), "the full replica was tried")
	require.Equal(t, float64(fullN.Load()), testutil.ToFloat64(r.retries.WithLabelValues(reason429)))

	full2, _ := failing(t, 429, `{"error":{"message":"still full","type":"RateLimitError","code":429}}`, "Retry-After", "7", "Content-Type", "application/json")
	r = routerOver(Config{}, &Endpoint{Model: "m", Addr: addr(full), Group: "a"}, &Endpoint{Model: "m", Addr: addr(full2), Group: "b"})
	rec := do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 429, rec.Code)
	require.Equal(t, "7", rec.Header().Get("Retry-After"))
	require.Contains(t, rec.Body.String(), "RateLimitError")
	// 429s are the engine saying it is full: nobody is ejected for them.
	for i := 0; i < 10; i++ {
		do(t, r.Handler(), `{"model":"m"}`, nil)
	}
	require.Zero(t, testutil.ToFloat64(r.ejections.WithLabelValues(reason429)))
}

// TestAttemptsAreCapped: five failing replicas, the default of two retries:
// three attempts, each at a different replica, and the answer says so.
func TestAttemptsAreCapped(t *testing.T) {
	var eps []*Endpoint
	var counts []*atomic.Int32
	for i := 0; i < 5; i++ {
		s, n := failing(t, 503, `{"error":{"message":"engine dead","code":503}}`)
		eps = append(eps, &Endpoint{Model: "m", Addr: addr(s)})
		counts = append(counts, n)
	}
	r := routerOver(Config{}, eps...)
	rec := do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 503, rec.Code)
	require.Equal(t, "3", rec.Header().Get("X-Shoal-Attempts"))
	total := int32(0)
	for _, n := range counts {
		require.LessOrEqual(t, n.Load(), int32(1), "no replica tried twice")
		total += n.Load()
	}
	require.Equal(t, int32(3), total)
	require.Equal(t, 2.0, testutil.ToFloat64(r.retries.WithLabelValues(reason5xx)))

	// A connection refused counts as "connect".
	good := backend(t, "ok", 0)
	r = routerOver(Config{}, &Endpoint{Model: "m", Addr: "127.0.0.1:1", Group: "dead"}, &Endpoint{Model: "m", Addr: addr(good), Group: "good"})
	for i := 0; i < 4; i++ {
		rec = do(t, r.Handler(), `{"model":"m"}`, map[string]string{"routing-strategy": "round-robin"})
		require.Equal(t, 200, rec.Code)
	}
	require.Positive(t, testutil.ToFloat64(r.retries.WithLabelValues(reasonConnect)))
}

// TestResetBeforeAnswerIsRetried: an engine that takes the request and
// closes without answering: another replica answers.
func TestResetBeforeAnswerIsRetried(t *testing.T) {
	ln := rawBackend(t, func(c net.Conn) { _, _ = c.Read(make([]byte, 4096)) })
	good := backend(t, "ok", 0)
	r := routerOver(Config{}, &Endpoint{Model: "m", Addr: ln.Addr().String(), Group: "bad"}, &Endpoint{Model: "m", Addr: addr(good), Group: "good"})
	for i := 0; i < 4; i++ {
		rec := do(t, r.Handler(), `{"model":"m"}`, map[string]string{"routing-strategy": "round-robin"})
		require.Equal(t, 200, rec.Code)
		require.Equal(t, "good", rec.Header().Get("X-Shoal-Replica"))
	}
	require.Positive(t, testutil.ToFloat64(r.retries.WithLabelValues(reasonReset)))
}

// TestOneFailureDoesNotEject: a replica that fails once keeps its share; it
// is ejected after EjectAfter failures in a row.
func TestOneFailureDoesNotEject(t *testing.T) {
	var flaky atomic.Int32
	e := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if flaky.Add(1) == 1 {
			w.WriteHeader(500)
			return
		}
		_, _ = io.WriteString(w, `{"ok":true}`)
	}))
	defer e.Close()
	other := backend(t, "other", 0)
	r := routerOver(Config{}, &Endpoint{Model: "m", Addr: addr(e), Group: "flaky"}, &Endpoint{Model: "m", Addr: addr(other), Group: "other"})
	hits := map[string]int{}
	for i := 0; i < 10; i++ {
		rec := do(t, r.Handler(), `{"model":"m"}`, map[string]string{"routing-strategy": "round-robin"})
		require.Equal(t, 200, rec.Code)
		hits[rec.Header().Get("X-Shoal-Replica")]++
	}
	require.GreaterOrEqual(t, hits["flaky"], 4, "one 500 did not take the replica out: %v", hits)
}

// TestOutlierEjection: Envoy-style consecutive-failure ejection with a fake
// clock: five in a row eject for the base time, the next ejection lasts
// twice as long, a success ends a streak, served time forgives.
func TestOutlierEjection(t *testing.T) {
	now := time.Unix(1000, 0)
	p := newPicker()
	p.now = func() time.Time { return now }
	const base = 10 * time.Second
	fail := func(n int) (d time.Duration) {
		for i := 0; i < n; i++ {
			d = p.outcome("a", true, 5, base)
		}
		return d
	}
	require.Zero(t, fail(4), "four failures: not yet")
	p.outcome("a", false, 5, base)
	require.Zero(t, fail(4), "a success ended the streak")
	require.Equal(t, base, fail(1), "the fifth in a row ejects")
	eps := []*Endpoint{{Model: "m", Addr: "a"}, {Model: "m", Addr: "b"}}
	for i := 0; i < 4; i++ {
		e, _, rel := p.pick(StrategyRoundRobin, eps, hint{model: "m"}, nil)
		require.Equal(t, "b", e.Addr)
		rel.release()
	}
	now = now.Add(base + time.Second)
	require.Equal(t, 2*base, fail(5), "ejected again soon: twice as long")
	now = now.Add(2*base + time.Second)
	// Served well for a long time: forgiven, the next ejection is short again.
	p.outcome("a", false, 5, base)
	now = now.Add(5 * base)
	p.outcome("a", false, 5, base)
	require.Equal(t, base, fail(5))

	// Ejected again and again, each right after the last ended: the time
	// grows by base each time, up to maxEjection.
	q := newPicker()
	q.now = func() time.Time { return now }
	for k := 1; k <= 8; k++ {
		var d time.Duration
		for i := 0; i < 5; i++ {
			d = q.outcome("b", true, 5, time.Minute)
		}
		require.Equal(t, min(time.Duration(k)*time.Minute, maxEjection), d, "ejection %d", k)
		now = now.Add(d + time.Second)
	}
}

func TestRetryHeaderOnSuccess(t *testing.T) {
	good := backend(t, "ok", 0)
	r := routerOver(Config{}, &Endpoint{Model: "m", Addr: addr(good)})
	rec := do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, "1", rec.Header().Get("X-Shoal-Attempts"))
	require.True(t, strings.HasPrefix(rec.Body.String(), "data: ok"))
}

// TestRetriesPerDeployment: a deployment's router.retries (carried by its
// heads) overrides the router's: none, or more than the default.
func TestRetriesPerDeployment(t *testing.T) {
	var eps []*Endpoint
	for i := 0; i < 5; i++ {
		s, _ := failing(t, 503, `{"error":{"message":"engine dead","code":503}}`)
		eps = append(eps, &Endpoint{Model: "m", Addr: addr(s)})
	}
	for retries, want := range map[int]string{0: "3", -1: "1", 4: "5"} {
		for _, e := range eps {
			e.Retries = retries
		}
		r := routerOver(Config{}, eps...)
		rec := do(t, r.Handler(), `{"model":"m"}`, nil)
		require.Equal(t, want, rec.Header().Get("X-Shoal-Attempts"), "deployment retries %d", retries)
	}
}

// TestEndpointCarriesDeploymentRetries: a head's router_retries becomes the
// endpoint's Retries (0 none, unset the router's own).
func TestEndpointCarriesDeploymentRetries(t *testing.T) {
	for _, tc := range []struct {
		in   *int32
		want int
	}{{nil, 0}, {proto.Int32(0), -1}, {proto.Int32(4), 4}} {
		ep := endpointOf(ReplicaView{Metrics: &replicav1.Metrics{ServedModelName: "m", Endpoint: "h:1", RouterRetries: tc.in}})
		require.Equal(t, tc.want, ep.Retries)
	}
}
