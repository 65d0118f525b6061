package e2e

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPoolingModelBecomesReady: an embedding model refuses completions (as
// vLLM does), so its readiness probe and idle canary must use the endpoint
// it serves; the replica becomes ready and serves embeddings through the
// router, while completions get the engine's own 400.
func TestPoolingModelBecomesReady(t *testing.T) {
	e := startCluster(t, 28, 1)
	e.apply("embed.yaml", `apiVersion: shoal/v1
name: embed
model: {source: /models/bge-m3}
engine: {kind: ray-vllm, servedModelName: bge, args: [--runner, pooling], startupTimeoutSeconds: 30}
resources: {nodes: 1, gpusPerNode: 8}
`)
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 45*time.Second, 200*time.Millisecond,
		"a pooling model must pass its readiness probe")
	post := func(path, body string) (int, string) {
		r, err := http.Post("http://"+e.router+path, "application/json", strings.NewReader(body))
		require.NoError(t, err)
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return r.StatusCode, string(b)
	}
	code, body := post("/v1/embeddings", `{"model":"bge","input":["a","b"]}`)
	require.Equal(t, 200, code, body)
	require.Contains(t, body, `"embedding"`)
	code, body = post("/v1/completions", `{"model":"bge","prompt":"x","max_tokens":1}`)
	require.Equal(t, 400, code)
	require.Contains(t, body, "The model does not support Completions API")
}
