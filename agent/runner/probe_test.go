package runner

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
)

// engineStub answers like vLLM for a model that serves one API (as a
// pooling model serves only embeddings), and records the canaries.
type engineStub struct {
	mu      sync.Mutex
	serves  string // the one POST path it accepts
	health  int
	bodies  []map[string]any
	metrics string
}

func (e *engineStub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case r.URL.Path == "/health":
		w.WriteHeader(e.health)
	case r.URL.Path == "/v1/models":
		_, _ = io.WriteString(w, `{"object":"list","data":[{"id":"m","object":"model"}]}`)
	case r.URL.Path == "/metrics":
		_, _ = io.WriteString(w, e.metrics)
	case r.Method == http.MethodPost && r.URL.Path == e.serves:
		var b map[string]any
		_ = json.NewDecoder(r.Body).Decode(&b)
		e.bodies = append(e.bodies, b)
		_, _ = io.WriteString(w, `{}`)
	case r.Method == http.MethodPost:
		w.WriteHeader(400)
		_, _ = io.WriteString(w, `{"error":{"message":"The model does not support this API","type":"BadRequestError","code":400}}`)
	default:
		w.WriteHeader(404)
	}
}

func TestHTTPProberCanaryUsesTheModelsEndpoint(t *testing.T) {
	for _, path := range []string{engine.CanaryCompletions, engine.CanaryChat, engine.CanaryEmbeddings} {
		t.Run(path, func(t *testing.T) {
			e := &engineStub{serves: path, health: 200}
			srv := httptest.NewServer(e)
			defer srv.Close()
			p := HTTPProber{Base: srv.URL, Served: "m", CanaryPath: path}
			require.NoError(t, p.Ready(context.Background()))
			require.Len(t, e.bodies, 1)
			require.Equal(t, "m", e.bodies[0]["model"])
			switch path {
			case engine.CanaryEmbeddings:
				require.Equal(t, "ping", e.bodies[0]["input"])
			case engine.CanaryChat:
				require.NotNil(t, e.bodies[0]["messages"])
				require.EqualValues(t, 1, e.bodies[0]["max_tokens"])
			default:
				require.Equal(t, "ping", e.bodies[0]["prompt"])
				require.EqualValues(t, 1, e.bodies[0]["max_tokens"])
			}
			// The same engine refuses any other API: a canary sent there
			// would keep the replica from ever becoming ready.
			for _, other := range []string{engine.CanaryCompletions, engine.CanaryChat, engine.CanaryEmbeddings} {
				if other != path {
					err := HTTPProber{Base: srv.URL, Served: "m", CanaryPath: other}.Ready(context.Background())
					require.ErrorContains(t, err, "400")
				}
			}
		})
	}
}

func TestHTTPProberChecks(t *testing.T) {
	e := &engineStub{serves: engine.CanaryCompletions, health: 200,
		metrics: "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 3\n"}
	srv := httptest.NewServer(e)
	defer srv.Close()
	ctx := context.Background()
	require.ErrorContains(t, HTTPProber{Base: srv.URL, Served: "other", CanaryPath: engine.CanaryCompletions}.Ready(ctx), `does not list "other"`)
	p := HTTPProber{Base: srv.URL, Served: "m"}
	require.NoError(t, p.Ready(ctx), "no canary path: health and models only")
	require.Empty(t, e.bodies)
	m, err := p.Scrape(ctx)
	require.NoError(t, err)
	require.Equal(t, 3.0, m.Running)
	e.mu.Lock()
	e.health = 503
	e.mu.Unlock()
	_, err = p.Scrape(ctx)
	require.EqualError(t, err, "GET /health: 503")
	require.ErrorContains(t, p.Ready(ctx), "GET /health: 503")
	_, err = HTTPProber{Base: "http://127.0.0.1:1"}.Scrape(ctx)
	require.Error(t, err)
	require.ErrorContains(t, HTTPProber{Base: srv.URL, CanaryPath: "/nope"}.Canary(ctx), `unknown endpoint "/nope"`)
}
