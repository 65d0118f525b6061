package router

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

// cardEngine is an engine with vLLM's /v1/models cards (the model and
// adapters whose parent it is), /version, and an echo of every POST's path.
func cardEngine(t *testing.T, model string, adapters ...string) (*httptest.Server, *atomic.Int32) {
	var posts atomic.Int32
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == "GET" && r.URL.Path == "/v1/models":
			data := []map[string]any{{"id": model, "object": "model", "created": 1764547200, "owned_by": "vllm", "root": "/models/" + model, "parent": nil, "max_model_len": 131072}}
			for _, a := range adapters {
				data = append(data, map[string]any{"id": a, "object": "model", "created": 1764547300, "owned_by": "vllm", "root": "/adapters/" + a, "parent": model})
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
		case r.Method == "GET" && r.URL.Path == "/version":
			_, _ = io.WriteString(w, `{"version":"0.11.0"}`)
		case r.Method == "POST":
			posts.Add(1)
			b, _ := io.ReadAll(r.Body)
			if strings.Contains(string(b), `"fail":true`) {
				w.WriteHeader(500)
				_, _ = io.WriteString(w, `{"error":{"message":"boom","type":"InternalServerError","code":500}}`)
				return
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"path": r.URL.Path, "body": string(b)})
		default:
			w.WriteHeader(404)
		}
	}))
	t.Cleanup(s.Close)
	return s, &posts
}

func getJSON(t *testing.T, h http.Handler, path string, hdr ...string) (int, map[string]any) {
	t.Helper()
	req := httptest.NewRequest("GET", path, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	var v map[string]any
	_ = json.Unmarshal(rec.Body.Bytes(), &v)
	return rec.Code, v
}

// TestModelsAreTheEnginesCards: GET /v1/models lists the engines' own cards
// (max_model_len, root, created, owned_by, adapters with their parent),
// merged across replicas; a model whose engine cannot be asked still shows;
// GET /v1/models/{id} answers one, slashes in the id included; a key sees
// only its models and their adapters.
func TestModelsAreTheEnginesCards(t *testing.T) {
	a1, _ := cardEngine(t, "m", "m-sql")
	a2, _ := cardEngine(t, "m", "m-sql")
	org, _ := cardEngine(t, "org/big")
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m", "org/big", "down"}, []*Endpoint{
		{Model: "m", Addr: addr(a1)}, {Model: "m", Addr: addr(a2)}, {Model: "org/big", Addr: addr(org)}, {Model: "down", Addr: "127.0.0.1:1"}}))
	r := New(tb, discard(), Config{})
	code, v := getJSON(t, r.Handler(), "/v1/models")
	require.Equal(t, 200, code)
	byID := map[string]map[string]any{}
	for _, d := range v["data"].([]any) {
		c := d.(map[string]any)
		byID[c["id"].(string)] = c
	}
	require.Len(t, byID, 4, "m, its adapter, org/big, down: %v", byID)
	require.Equal(t, 131072.0, byID["m"]["max_model_len"])
	require.Equal(t, "vllm", byID["m"]["owned_by"])
	require.Equal(t, 1764547200.0, byID["m"]["created"])
	require.Equal(t, "m", byID["m-sql"]["parent"])
	require.Equal(t, "down", byID["down"]["id"])

	code, v = getJSON(t, r.Handler(), "/v1/models/org/big")
	require.Equal(t, 200, code)
	require.Equal(t, "org/big", v["id"])
	code, v = getJSON(t, r.Handler(), "/v1/models/nope")
	require.Equal(t, 404, code)
	require.Contains(t, v["error"].(map[string]any)["message"], "does not exist")

	key, e, err := NewKey("team", []string{"m"}, 0, 0)
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "keys.yaml")
	require.NoError(t, os.WriteFile(p, []byte("keys:\n"+indent(MarshalEntry(e))), 0o600))
	keys, err := LoadAPIKeys(p)
	require.NoError(t, err)
	r = New(tb, discard(), Config{APIKeys: keys})
	_, v = getJSON(t, r.Handler(), "/v1/models", "Authorization", "Bearer "+key)
	var ids []string
	for _, d := range v["data"].([]any) {
		ids = append(ids, d.(map[string]any)["id"].(string))
	}
	require.ElementsMatch(t, []string{"m", "m-sql"}, ids)
	code, _ = getJSON(t, r.Handler(), "/v1/models/org/big", "Authorization", "Bearer "+key)
	require.Equal(t, 404, code)
}

// TestModelRoutedEndpoints: every model-routed vLLM endpoint reaches the
// model's engine at its own path, through net/http and the fast path;
// /version is the engine's.
func TestModelRoutedEndpoints(t *testing.T) {
	eng, _ := cardEngine(t, "m")
	r, _ := newRouter(&Endpoint{Model: "m", Addr: addr(eng), Group: "g"})
	front := startFront(t, r)
	for _, p := range modelRoutes {
		rec := httptest.NewRecorder()
		r.Handler().ServeHTTP(rec, httptest.NewRequest("POST", p, strings.NewReader(`{"model":"m","input":"x"}`)))
		require.Equal(t, 200, rec.Code, p)
		require.Contains(t, rec.Body.String(), `"path":"`+p+`"`)
		resp := rawExchange(t, front, post(p, `{"model":"m","input":"x"}`), 1)[0]
		require.Equal(t, 200, resp.StatusCode, p)
		require.Contains(t, body(t, resp), `"path":"`+p+`"`)
	}
	code, v := getJSON(t, r.Handler(), "/version")
	require.Equal(t, 200, code)
	require.Equal(t, "0.11.0", v["version"])
	r, _ = newRouter()
	code, _ = getJSON(t, r.Handler(), "/version")
	require.Equal(t, 503, code)
}

// TestStoredResponsesAreNeverSentTwice: a Responses API request that the
// engine stores (store defaults to true) is not retried at another replica;
// with store: false it is.
func TestStoredResponsesAreNeverSentTwice(t *testing.T) {
	a, an := cardEngine(t, "m")
	b, bn := cardEngine(t, "m")
	r, _ := newRouter(&Endpoint{Model: "m", Addr: addr(a)}, &Endpoint{Model: "m", Addr: addr(b)})
	for _, body := range []string{`{"model":"m","input":"x","fail":true}`, `{"model":"m","input":"x","store":true,"fail":true}`} {
		rec := httptest.NewRecorder()
		r.Handler().ServeHTTP(rec, httptest.NewRequest("POST", "/v1/responses", strings.NewReader(body)))
		require.Equal(t, 500, rec.Code)
		require.Equal(t, "1", rec.Header().Get("X-Shoal-Attempts"))
	}
	require.Equal(t, int32(2), an.Load()+bn.Load())
	rec := httptest.NewRecorder()
	r.Handler().ServeHTTP(rec, httptest.NewRequest("POST", "/v1/responses", strings.NewReader(`{"model":"m","input":"x","store":false,"fail":true}`)))
	require.Equal(t, "2", rec.Header().Get("X-Shoal-Attempts"))
}

// TestCORS: vLLM's defaults (any origin) answer preflights and mark
// answers on both paths; a restricted policy refuses as Starlette does.
func TestCORS(t *testing.T) {
	eng, _ := cardEngine(t, "m")
	r, _ := newRouter(&Endpoint{Model: "m", Addr: addr(eng)})
	front := startFront(t, r)
	pre := "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n"
	resp := rawExchange(t, front, pre, 1)[0]
	require.Equal(t, 200, resp.StatusCode)
	require.Equal(t, "*", resp.Header.Get("Access-Control-Allow-Origin"))
	require.Equal(t, "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT", resp.Header.Get("Access-Control-Allow-Methods"))
	require.Equal(t, "authorization, content-type", resp.Header.Get("Access-Control-Allow-Headers"))
	require.Equal(t, "600", resp.Header.Get("Access-Control-Max-Age"))
	resp = rawExchange(t, front, post("/v1/completions", `{"model":"m"}`, "Origin: https://app.example\r\n"), 1)[0]
	require.Equal(t, 200, resp.StatusCode)
	require.Equal(t, "*", resp.Header.Get("Access-Control-Allow-Origin"), "fast path")
	resp = rawExchange(t, front, "GET /v1/models HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n", 1)[0]
	require.Equal(t, "*", resp.Header.Get("Access-Control-Allow-Origin"), "net/http path")

	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{{Model: "m", Addr: addr(eng)}}))
	r = New(tb, discard(), Config{CORS: CORS{Origins: []string{"https://ok.example"}, Credentials: true}})
	front = startFront(t, r)
	resp = rawExchange(t, front, pre, 1)[0]
	require.Equal(t, 400, resp.StatusCode)
	require.Equal(t, "Disallowed CORS origin", body(t, resp))
	resp = rawExchange(t, front, strings.Replace(pre, "https://app.example", "https://ok.example", 1), 1)[0]
	require.Equal(t, 200, resp.StatusCode)
	require.Equal(t, "https://ok.example", resp.Header.Get("Access-Control-Allow-Origin"))
	require.Equal(t, "true", resp.Header.Get("Access-Control-Allow-Credentials"))
	require.Equal(t, "Origin", resp.Header.Get("Vary"))
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
