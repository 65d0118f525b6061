package router

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func backend(t *testing.T, name string, delay time.Duration) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(delay)
		w.Header().Set("Content-Type", "text/event-stream")
		fl := w.(http.Flusher)
		for i := 0; i < 3; i++ {
			_, _ = io.WriteString(w, "data: "+name+"\n\n")
			fl.Flush()
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	}))
	t.Cleanup(s.Close)
	return s
}

func addr(s *httptest.Server) string { return strings.TrimPrefix(s.URL, "http://") }

func newRouter(eps ...*Endpoint) (*Router, *Table) {
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m", "cold"}, eps))
	return New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{}), tb
}

// do serves one request to a recorder. A handler that aborts the answer
// (http.ErrAbortHandler: net/http closes the connection mid-answer) leaves
// the header X-Test-Aborted.
func do(t *testing.T, h http.Handler, body string, hdr map[string]string) (rec *httptest.ResponseRecorder) {
	req := httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(body))
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	rec = httptest.NewRecorder()
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler {
				panic(v)
			}
			rec.Header().Set("X-Test-Aborted", "1")
		}
	}()
	h.ServeHTTP(rec, req)
	return rec
}

func errBody(t *testing.T, rec *httptest.ResponseRecorder) map[string]any {
	var v map[string]map[string]any
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &v), rec.Body.String())
	return v["error"]
}

func TestRouterErrors(t *testing.T) {
	r, _ := newRouter()
	h := r.Handler()
	rec := do(t, h, `{"model":`, nil)
	require.Equal(t, 400, rec.Code)
	require.Contains(t, errBody(t, rec)["message"], "parse the JSON")

	rec = do(t, h, `{"messages":[]}`, nil)
	require.Equal(t, 400, rec.Code)
	require.Equal(t, "model", errBody(t, rec)["param"])

	rec = do(t, h, `{"model":"nope"}`, nil)
	require.Equal(t, 404, rec.Code)
	require.Equal(t, "model_not_found", errBody(t, rec)["code"])

	rec = do(t, h, `{"model":"cold"}`, nil)
	require.Equal(t, 503, rec.Code)
	require.Equal(t, "5", rec.Header().Get("Retry-After"))

	rec = do(t, h, `{"model":"m"}`, map[string]string{"routing-strategy": "psychic"})
	require.Equal(t, 400, rec.Code)
	require.Contains(t, errBody(t, rec)["message"], "least-request")
}

func TestRouterStreamsAndRetries(t *testing.T) {
	b := backend(t, "b1", 0)
	// A dead address first: the router must try it, fail to connect, and use b1.
	r, _ := newRouter(&Endpoint{Model: "m", Addr: "127.0.0.1:1", Group: "dead"}, &Endpoint{Model: "m", Addr: addr(b), Group: "g1"})
	h := r.Handler()
	for i := 0; i < 5; i++ {
		rec := do(t, h, `{"model":"m","stream":true}`, map[string]string{"routing-strategy": "random"})
		require.Equal(t, 200, rec.Code)
		require.Equal(t, "g1", rec.Header().Get("X-Shoal-Replica"))
		require.Equal(t, "data: b1\n\ndata: b1\n\ndata: b1\n\ndata: [DONE]\n\n", rec.Body.String())
	}
}

func TestRouterRetries5xx(t *testing.T) {
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(500)
		_, _ = io.WriteString(w, `{"error":{"message":"EngineCore encountered an issue","code":500}}`)
	}))
	defer bad.Close()
	good := backend(t, "ok", 0)
	r, _ := newRouter(&Endpoint{Model: "m", Addr: addr(bad), Group: "bad"}, &Endpoint{Model: "m", Addr: addr(good), Group: "good"})
	for i := 0; i < 10; i++ {
		rec := do(t, r.Handler(), `{"model":"m"}`, map[string]string{"routing-strategy": "random"})
		require.Equal(t, 200, rec.Code)
		require.Equal(t, "good", rec.Header().Get("X-Shoal-Replica"))
	}
	// With only the failing replica, its 500 reaches the client as it was.
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{{Model: "m", Addr: addr(bad), Group: "bad"}}))
	r = New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{Retries: -1})
	rec := do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 500, rec.Code)
	require.Contains(t, rec.Body.String(), "EngineCore")
}

func TestLeastRequestSpreads(t *testing.T) {
	slow1 := backend(t, "s1", 300*time.Millisecond)
	slow2 := backend(t, "s2", 300*time.Millisecond)
	r, _ := newRouter(&Endpoint{Model: "m", Addr: addr(slow1)}, &Endpoint{Model: "m", Addr: addr(slow2)})
	h := r.Handler()
	var mu sync.Mutex
	count := map[string]int{}
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := do(t, h, `{"model":"m"}`, map[string]string{"routing-strategy": "least-request"})
			mu.Lock()
			count[strings.SplitN(rec.Body.String(), "\n", 2)[0]]++
			mu.Unlock()
		}()
		time.Sleep(20 * time.Millisecond) // each request is open when the next is routed
	}
	wg.Wait()
	require.Equal(t, map[string]int{"data: s1": 3, "data: s2": 3}, count)
}

func TestModelsListsReadyOnly(t *testing.T) {
	r, _ := newRouter(&Endpoint{Model: "m", Addr: "127.0.0.1:9"})
	rec := httptest.NewRecorder()
	r.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/v1/models", nil))
	require.Equal(t, 200, rec.Code)
	require.Contains(t, rec.Body.String(), `"id":"m"`)
	require.NotContains(t, rec.Body.String(), "cold")
}

func FuzzRouterBody(f *testing.F) {
	f.Add([]byte(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`))
	f.Add([]byte(`{"model":null}`))
	f.Add([]byte(`[]`))
	r, _ := newRouter()
	h := r.Handler()
	f.Fuzz(func(t *testing.T, b []byte) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", "/v1/completions", strings.NewReader(string(b))))
		if rec.Code != 400 && rec.Code != 404 && rec.Code != 503 {
			t.Fatalf("status %d for %q", rec.Code, b)
		}
	})
}

// TestIdleTimeoutEndsHungStream: an engine that stops sending (the vllm#53157
// hang) is cut after IdleTimeout; a slow but live one is not.
func TestIdleTimeoutEndsHungStream(t *testing.T) {
	hung := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done() // never another byte
	}))
	defer hung.Close()
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := 0; i < 5; i++ {
			_, _ = io.WriteString(w, "data: tick\n\n")
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	}))
	defer slow.Close()
	for name, c := range map[string]struct {
		addr  string
		ticks int
	}{"hung": {addr(hung), 0}, "slow": {addr(slow), 5}} {
		tb := NewTable()
		tb.Set(NewSnapshot(nil, []*Endpoint{{Model: "m", Addr: c.addr}}))
		r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{IdleTimeout: 300 * time.Millisecond})
		start := time.Now()
		rec := do(t, r.Handler(), `{"model":"m","stream":true}`, nil)
		require.Less(t, time.Since(start), 3*time.Second, name)
		require.Equal(t, c.ticks, strings.Count(rec.Body.String(), "tick"), name)
		if name == "hung" {
			require.Contains(t, rec.Body.String(), "first")
			require.Equal(t, "1", rec.Header().Get("X-Test-Aborted"), "a cut stream is aborted, not ended")
			require.Contains(t, rec.Body.String(), `data: {"error":{"message":"the engine's stream broke after it began`, "with an error event first")
		} else {
			require.Empty(t, rec.Header().Get("X-Test-Aborted"))
		}
	}
}

// TestHostileBodies: oversized, deeply nested and non-UTF-8 bodies get a
// clear 4xx, never a crash or a hang.
func TestHostileBodies(t *testing.T) {
	r, _ := newRouter()
	h := r.Handler()
	cases := map[string]struct {
		body string
		code int
	}{
		"deep nesting":  {`{"model":"m","x":` + strings.Repeat("[", 200000) + strings.Repeat("]", 200000) + `}`, 0},
		"deep unclosed": {strings.Repeat("[", 100000), 400},
		"non-utf8":      {"{\"model\":\"m\xff\xfe\",\"prompt\":\"\xc3\x28\"}", 0},
		"oversized":     {`{"model":"m","prompt":"` + strings.Repeat("a", 65<<20) + `"}`, 413},
		"nul bytes":     {"{\"model\":\"m\x00\"}", 0},
	}
	for name, c := range cases {
		done := make(chan int, 1)
		go func() {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(c.body)))
			done <- rec.Code
		}()
		select {
		case code := <-done:
			if c.code != 0 {
				require.Equal(t, c.code, code, name)
			}
			require.True(t, code >= 400 && code < 600, "%s: %d", name, code)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no answer within 10 s", name)
		}
	}
}

func FuzzAPIKeysFile(f *testing.F) {
	f.Add([]byte("keys:\n  - {name: a, sha256: " + strings.Repeat("ab", 32) + ", models: [m], rps: 1}\n"))
	f.Add([]byte("keys: []\n"))
	f.Add([]byte("sk: [m]\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := dir + "/k.yaml"
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Skip()
		}
		ks, err := LoadAPIKeys(p)
		if err == nil && !ks.enabled() {
			t.Fatal("a file that loads must hold keys")
		}
	})
}

// TestClientDisconnectCancelsEngineRequest: a client that goes away, while
// streaming or while waiting for a long non-streamed answer, ends the
// engine's request (vLLM aborts it and frees its KV cache) within a second.
func TestClientDisconnectCancelsEngineRequest(t *testing.T) {
	aborted := make(chan string, 4)
	eng := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		stream := strings.Contains(string(b), `"stream":true`)
		if stream {
			w.Header().Set("Content-Type", "text/event-stream")
		}
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < 500; i++ { // 10 s of tokens
			select {
			case <-r.Context().Done():
				aborted <- map[bool]string{true: "stream", false: "whole"}[stream]
				return
			case <-tick.C:
				if stream {
					_, _ = io.WriteString(w, "data: tok\n\n")
					w.(http.Flusher).Flush()
				}
			}
		}
		_, _ = io.WriteString(w, `{"done":true}`)
	}))
	defer eng.Close()
	r, _ := newRouter(&Endpoint{Model: "m", Addr: addr(eng), Group: "g"})
	front := httptest.NewServer(r.Handler())
	defer front.Close()
	for _, kind := range []string{"stream", "whole"} {
		t.Run(kind, func(t *testing.T) {
			body := `{"model":"m"}`
			if kind == "stream" {
				body = `{"model":"m","stream":true}`
			}
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, "POST", front.URL+"/v1/completions", strings.NewReader(body))
			done := make(chan struct{})
			go func() {
				defer close(done)
				resp, err := front.Client().Do(req)
				if err == nil {
					buf := make([]byte, 64)
					_, _ = resp.Body.Read(buf) // the first event
					cancel()
					resp.Body.Close()
				}
			}()
			if kind == "whole" {
				time.Sleep(200 * time.Millisecond) // the engine is computing
				cancel()
			}
			<-done
			start := time.Now()
			select {
			case k := <-aborted:
				require.Equal(t, kind, k)
			case <-time.After(2 * time.Second):
				t.Fatal("the engine's request went on after the client left")
			}
			require.Less(t, time.Since(start), time.Second)
		})
	}
}

// TestTotalTimeout: a configured total timeout answers 504 before any byte
// and cuts a stream after it; the default has none.
func TestTotalTimeout(t *testing.T) {
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	}))
	defer slow.Close()
	tb := NewTable()
	tb.Set(NewSnapshot(nil, []*Endpoint{{Model: "m", Addr: addr(slow)}}))
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{TotalTimeout: 200 * time.Millisecond})
	start := time.Now()
	rec := do(t, r.Handler(), `{"model":"m"}`, nil)
	require.Equal(t, 504, rec.Code, rec.Body.String())
	require.Equal(t, "timeout", errBody(t, rec)["code"])
	require.Less(t, time.Since(start), 2*time.Second)
}
