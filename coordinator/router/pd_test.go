package router

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/shoalhq/shoal/engine/sim"
	"github.com/stretchr/testify/require"
)

// freePort is a port free on ip now.
func freePort(t *testing.T, ip string) int {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// simPD starts a simulated NixlConnector engine; its side channel listens
// on ip.
func simPD(t *testing.T, ip string) (*sim.Server, string) {
	t.Helper()
	pr := sim.Presets["llama-8b-h100-tp1"]
	s := sim.NewServer("m", pr.Params, 50)
	require.NoError(t, s.EnableNIXL(pr, ip, freePort(t, ip), "fail"))
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(func() { hs.Close(); cancel(); s.Close() })
	return s, strings.TrimPrefix(hs.URL, "http://")
}

// The router's two hops against simulated vLLM engines: the prompt is
// computed on a prefill engine (a dead one first: its failure is counted
// and another prefill engine tried), its KV reaches the decode engine
// (a prefix-cache hit there), and the decode engine's answer — streamed or
// not — is the client's.
func TestRouterPrefillDecode(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "0")
	_, p := simPD(t, "127.0.9.30")
	d, da := simPD(t, "127.0.9.31")
	r, _ := newRouter(&Endpoint{Model: "m", Addr: "127.0.0.1:1", Group: "p-dead", Role: RolePrefill},
		&Endpoint{Model: "m", Addr: p, Group: "p1", Role: RolePrefill}, &Endpoint{Model: "m", Addr: da, Group: "d1", Role: RoleDecode})
	h := r.Handler()
	prompt := strings.Repeat("a rather long prompt about prefill and decode ", 20)
	for _, stream := range []bool{false, true} {
		body := `{"model":"m","messages":[{"role":"user","content":"` + prompt + `"}],"max_tokens":6,"ignore_eos":true,"stream":` + map[bool]string{false: "false", true: "true"}[stream] + `}`
		before := d.PrefixHits()
		rec := do(t, h, body, map[string]string{"routing-strategy": "round-robin"})
		require.Equal(t, 200, rec.Code, rec.Body.String())
		require.Equal(t, "d1", rec.Header().Get("X-Shoal-Replica"), "the decode engine answers")
		if stream {
			require.Equal(t, "text/event-stream", strings.Split(rec.Header().Get("Content-Type"), ";")[0])
			sc := bufio.NewScanner(strings.NewReader(rec.Body.String()))
			chunks := 0
			for sc.Scan() {
				if strings.HasPrefix(sc.Text(), "data: {") && strings.Contains(sc.Text(), `"content":`) {
					chunks++
				}
			}
			require.GreaterOrEqual(t, chunks, 6)
		} else {
			require.Contains(t, rec.Body.String(), `"completion_tokens":6`)
		}
		require.Greater(t, d.PrefixHits(), before+100, "the decode engine had the prompt's KV")
	}
	// Until the dead prefill engine is picked first (ties break at random)
	// and its failure is counted; the request is prefilled elsewhere.
	for i := 0; i < 40 && (i == 0 || testutil.ToFloat64(r.prefills.WithLabelValues("failed")) == 0); i++ {
		rec := do(t, h, `{"model":"m","messages":[{"role":"user","content":"`+prompt+`"}],"max_tokens":2}`, nil)
		require.Equal(t, 200, rec.Code, rec.Body.String())
	}
	require.Positive(t, testutil.ToFloat64(r.prefills.WithLabelValues("failed")), "a dead prefill engine counts as a failure")
	require.GreaterOrEqual(t, testutil.ToFloat64(r.prefills.WithLabelValues("ok")), 2.0)

	// No prefill engine left: the decode engine serves the request whole
	// (it prefills itself), counted as a fallback, not failed.
	r2, _ := newRouter(&Endpoint{Model: "m", Addr: "127.0.0.1:1", Group: "p-dead", Role: RolePrefill},
		&Endpoint{Model: "m", Addr: da, Group: "d1", Role: RoleDecode})
	before := d.PrefixHits()
	rec := do(t, r2.Handler(), `{"model":"m","messages":[{"role":"user","content":"`+strings.Repeat("an unrelated question nobody asked before ", 20)+`"}],"max_tokens":4}`, nil)
	require.Equal(t, 200, rec.Code, rec.Body.String())
	require.Equal(t, 1.0, testutil.ToFloat64(r2.prefills.WithLabelValues("fallback")))
	require.Less(t, d.PrefixHits()-before, 100.0, "no KV came from a prefill engine")

	// A request the prefill engine refuses (4xx) is refused, not retried whole.
	r3, _ := newRouter(&Endpoint{Model: "m", Addr: p, Group: "p1", Role: RolePrefill}, &Endpoint{Model: "m", Addr: da, Group: "d1", Role: RoleDecode})
	rec = do(t, r3.Handler(), `{"model":"m","messages":[],"max_tokens":4}`, nil)
	require.Equal(t, 400, rec.Code, rec.Body.String())
}

func TestPrefillBody(t *testing.T) {
	b, err := prefillBody([]byte(`{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":99,"min_tokens":5}`))
	require.NoError(t, err)
	s := string(b)
	for _, want := range []string{`"stream":false`, `"max_tokens":1`, `"max_completion_tokens":1`, `"do_remote_decode":true`} {
		require.Contains(t, s, want)
	}
	require.NotContains(t, s, "stream_options")
	require.NotContains(t, s, "min_tokens")
	db, err := decodeBody([]byte(`{"model":"m","stream":true}`), []byte(`{"do_remote_prefill":true}`))
	require.NoError(t, err)
	require.JSONEq(t, `{"model":"m","stream":true,"kv_transfer_params":{"do_remote_prefill":true}}`, string(db))
}

func TestParseBackends(t *testing.T) {
	eps, err := ParseBackends([]string{"prefill:m=10.0.0.1:8000", "decode:m=10.0.0.2:8000", "x=10.0.0.3:8000", "org/m:v2=10.0.0.4:8000"})
	require.NoError(t, err)
	require.Equal(t, RolePrefill, eps[0].Role)
	require.Equal(t, RoleDecode, eps[1].Role)
	require.Empty(t, eps[2].Role)
	require.Equal(t, "org/m:v2", eps[3].Model, "a colon in a model name is not a role")
	for b, want := range map[string]string{
		"prefill:m=10.0.0.1:8000": "none to decode on",
		"decode:m=10.0.0.1:8000":  "none to prefill on",
		"prefill:m=nohost":        "want [prefill:|decode:]MODEL=HOST:PORT",
	} {
		_, err := ParseBackends([]string{b})
		require.ErrorContains(t, err, want, b)
	}
}

// Warming runs the handshake of every prefill/decode pair before users
// come: afterwards each decode engine knows each prefill engine; a pair
// that cannot be warmed is reported, not fatal.
func TestWarmPairs(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "1")
	_, p1 := simPD(t, "127.0.9.32")
	_, p2 := simPD(t, "127.0.9.33")
	d1, d1a := simPD(t, "127.0.9.34")
	d2, d2a := simPD(t, "127.0.9.35")
	eps := []*Endpoint{{Model: "m", Addr: p1, Role: RolePrefill}, {Model: "m", Addr: p2, Role: RolePrefill},
		{Model: "m", Addr: d1a, Role: RoleDecode}, {Model: "m", Addr: d2a, Role: RoleDecode},
		{Model: "plain", Addr: "127.0.0.1:1"}}
	r, _ := newRouter(eps...)
	n, errs := r.WarmPairs(context.Background(), eps)
	require.Empty(t, errs)
	require.Equal(t, 4, n, "2 prefill × 2 decode")
	require.Equal(t, 2, d1.Paired())
	require.Equal(t, 2, d2.Paired())

	dead := append(eps, &Endpoint{Model: "m", Addr: "127.0.0.1:1", Role: RolePrefill})
	n, errs = r.WarmPairs(context.Background(), dead)
	require.Equal(t, 4, n)
	require.Len(t, errs, 2, "the dead prefill engine's two pairs")
	require.ErrorContains(t, errs[0], "prefill")
}

// endpointsOfModel is the snapshot's endpoints of m, by group.
func groupsOf(s *Snapshot, m string) []string {
	eps, _ := s.Endpoints(m)
	var out []string
	for _, e := range eps {
		out = append(out, e.Group)
	}
	slices.Sort(out)
	return out
}

// The gate of routers fed by the heads: a decode (or prefill) endpoint
// joining while others of its role serve is held out until its pairs are
// warmed, then let in; the decode engine then knows every prefill engine
// before its first user request. Endpoints of a role with nothing warmed
// yet are let in at once, and a pair that cannot be warmed is let in too
// (its first request pays the handshake) and counted.
func TestWarmerGatesNewEndpoints(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "5") // 100 ms real
	_, p1 := simPD(t, "127.0.9.36")
	_, d1a := simPD(t, "127.0.9.37")
	d2, d2a := simPD(t, "127.0.9.38")
	r, _ := newRouter()
	changed := make(chan struct{}, 16)
	w := r.NewWarmer(func() { changed <- struct{}{} })
	defer w.Close()
	pe := &Endpoint{Model: "m", Addr: p1, Group: "p1", Epoch: 1, Role: RolePrefill, Rank: -1}
	de1 := &Endpoint{Model: "m", Addr: d1a, Group: "d1", Epoch: 1, Role: RoleDecode, Rank: -1}
	de2 := &Endpoint{Model: "m", Addr: d2a, Group: "d2", Epoch: 1, Role: RoleDecode, Rank: -1}
	plain := &Endpoint{Model: "plain", Addr: "127.0.0.1:1", Group: "x", Rank: -1}

	s := w.Gate(NewSnapshot(nil, []*Endpoint{pe, de1, plain}))
	require.Equal(t, []string{"d1", "p1"}, groupsOf(s, "m"), "nothing warmed yet: the model serves on what it has")
	require.Equal(t, []string{"x"}, groupsOf(s, "plain"), "other models pass untouched")
	<-changed
	s = w.Gate(NewSnapshot(nil, []*Endpoint{pe, de1, de2, plain}))
	require.Equal(t, []string{"d1", "p1"}, groupsOf(s, "m"), "d2 waits for its pair's warm-up")
	require.Equal(t, 1.0, testutil.ToFloat64(w.held))
	<-changed
	s = w.Gate(NewSnapshot(nil, []*Endpoint{pe, de1, de2, plain}))
	require.Equal(t, []string{"d1", "d2", "p1"}, groupsOf(s, "m"), "warmed: d2 takes requests")
	require.Equal(t, 1, d2.Paired(), "d2 handshook with the prefill engine before any user request")
	require.Equal(t, 2.0, testutil.ToFloat64(w.outcomes.WithLabelValues("ok")))

	// A prefill endpoint that cannot be warmed is held until it fails, then let in.
	dead := &Endpoint{Model: "m", Addr: "127.0.0.1:1", Group: "p-dead", Epoch: 1, Role: RolePrefill, Rank: -1}
	s = w.Gate(NewSnapshot(nil, []*Endpoint{pe, dead, de1, de2}))
	require.Equal(t, []string{"d1", "d2", "p1"}, groupsOf(s, "m"))
	<-changed
	<-changed
	s = w.Gate(NewSnapshot(nil, []*Endpoint{pe, dead, de1, de2}))
	require.Equal(t, []string{"d1", "d2", "p-dead", "p1"}, groupsOf(s, "m"))
	require.Equal(t, 2.0, testutil.ToFloat64(w.outcomes.WithLabelValues("failed")))

	// A re-formed group (new epoch) is a new engine: warmed again.
	pe2 := *pe
	pe2.Epoch = 2
	s = w.Gate(NewSnapshot(nil, []*Endpoint{&pe2, de1, de2}))
	require.Equal(t, []string{"d1", "d2", "p1"}, groupsOf(s, "m"), "the only prefill endpoint is let in at once")
	<-changed
	<-changed
	require.Equal(t, 4.0, testutil.ToFloat64(w.outcomes.WithLabelValues("ok")))
}

// simSGLang starts a simulated SGLang engine in disaggregation mode; a
// prefill engine's bootstrap server listens on ip.
func simSGLang(t *testing.T, ip, mode string) (*sim.Server, *Endpoint) {
	t.Helper()
	pr := sim.Presets["llama-8b-h100-tp1"]
	s := sim.NewServer("m", pr.Params, 50)
	port := freePort(t, ip)
	require.NoError(t, s.EnableSGLangDisagg(pr, mode, ip, port))
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	hl, err := net.Listen("tcp", ip+":0")
	require.NoError(t, err)
	hs := &httptest.Server{Listener: hl, Config: &http.Server{Handler: s.Handler()}}
	hs.Start()
	t.Cleanup(func() { hs.Close(); cancel(); s.Close() })
	ep := &Endpoint{Model: "m", Addr: strings.TrimPrefix(hs.URL, "http://"), Group: mode + "-" + ip, Rank: -1, Role: RoleDecode, SGLangPD: true}
	if mode == "prefill" {
		ep.Role, ep.BootstrapPort = RolePrefill, port
	}
	return s, ep
}

// SGLang's protocol through the router: the same body with the prefill
// engine's bootstrap host, port and a room reaches both engines at once;
// the decode engine's answer (streamed or not) is the client's, built on
// the KV the prefill engine handed over. A prefill engine that fails is
// counted and another tried, the decode engine not blamed; with none left
// the client gets a 502 naming the prefill side.
func TestRouterSGLangPrefillDecode(t *testing.T) {
	_, pe := simSGLang(t, "127.0.9.40", "prefill")
	d, de := simSGLang(t, "127.0.9.41", "decode")
	dead := &Endpoint{Model: "m", Addr: "127.0.0.1:1", Group: "p-dead", Rank: -1, Role: RolePrefill, BootstrapPort: 1}
	r, _ := newRouter(dead, pe, de)
	h := r.Handler()
	prompt := strings.Repeat("a rather long prompt about sglang disaggregation ", 20)
	for _, stream := range []bool{false, true} {
		body := `{"model":"m","messages":[{"role":"user","content":"` + prompt + `"}],"max_tokens":6,"ignore_eos":true,"stream":` + strconv.FormatBool(stream) + `}`
		before := d.PrefixHits()
		rec := do(t, h, body, nil)
		require.Equal(t, 200, rec.Code, rec.Body.String())
		require.Equal(t, de.Group, rec.Header().Get("X-Shoal-Replica"), "the decode engine answers")
		if stream {
			require.Contains(t, rec.Body.String(), "data: [DONE]")
		} else {
			require.Contains(t, rec.Body.String(), `"completion_tokens":6`)
		}
		require.Greater(t, d.PrefixHits(), before+100, "the decode engine had the prompt's KV from the prefill engine")
	}
	require.Equal(t, 0.0, testutil.ToFloat64(r.ejections.WithLabelValues("5xx"))+testutil.ToFloat64(r.ejections.WithLabelValues("reset")), "the decode engine is never blamed")
	for i := 0; i < 40 && (i == 0 || testutil.ToFloat64(r.prefills.WithLabelValues("failed")) == 0); i++ {
		rec := do(t, h, `{"model":"m","messages":[{"role":"user","content":"`+prompt+`"}],"max_tokens":2}`, nil)
		require.Equal(t, 200, rec.Code, rec.Body.String())
	}
	require.Positive(t, testutil.ToFloat64(r.prefills.WithLabelValues("failed")), "the dead prefill engine's failure is counted")
	require.GreaterOrEqual(t, testutil.ToFloat64(r.prefills.WithLabelValues("ok")), 3.0, "two requests and the retried one")

	r2, _ := newRouter(dead, de)
	rec := do(t, r2.Handler(), `{"model":"m","messages":[{"role":"user","content":"`+prompt+`"}],"max_tokens":2}`, nil)
	require.Equal(t, 502, rec.Code, rec.Body.String())
	require.Contains(t, rec.Body.String(), "No prefill replica of `m` could prefill the request")
}

// With prefix-cache routing a prompt is prefilled where its prefix is
// cached: requests sharing a long prefix keep to one prefill engine.
func TestPrefillByPrefixAffinity(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "0")
	p1, p1a := simPD(t, "127.0.9.42")
	p2, p2a := simPD(t, "127.0.9.43")
	_, da := simPD(t, "127.0.9.44")
	r, _ := newRouter(&Endpoint{Model: "m", Addr: p1a, Group: "p1", Role: RolePrefill, Rank: -1}, &Endpoint{Model: "m", Addr: p2a, Group: "p2", Role: RolePrefill, Rank: -1},
		&Endpoint{Model: "m", Addr: da, Group: "d1", Role: RoleDecode, Rank: -1})
	h := r.Handler()
	shared := strings.Repeat("a long system prompt every request shares ", 30)
	for i := 0; i < 6; i++ {
		rec := do(t, h, `{"model":"m","messages":[{"role":"user","content":"`+shared+strconv.Itoa(i)+`"}],"max_tokens":2}`, map[string]string{"routing-strategy": "prefix-cache"})
		require.Equal(t, 200, rec.Code, rec.Body.String())
	}
	hits := []float64{p1.PrefixHits(), p2.PrefixHits()}
	require.Greater(t, max(hits[0], hits[1]), 5*200.0, "the later requests found the shared prefix on the prefill engine they went to")
	require.Zero(t, min(hits[0], hits[1]), "all went to one prefill engine")
}

// SGLang decode engines with no prefill engine ready cannot serve alone:
// the client gets a 503 to retry, not the engine's 400.
func TestSGLangDecodeWithoutPrefill(t *testing.T) {
	_, de := simSGLang(t, "127.0.9.45", "decode")
	r, _ := newRouter(de)
	rec := do(t, r.Handler(), `{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`, nil)
	require.Equal(t, 503, rec.Code, rec.Body.String())
	require.Contains(t, rec.Body.String(), "No prefill replica of `m` is ready")
	require.Equal(t, "5", rec.Header().Get("Retry-After"))
}
