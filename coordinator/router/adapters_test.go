package router

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeLoader records loads and answers with err for a group.
type fakeLoader struct {
	mu    sync.Mutex
	loads []string // group:adapter
	fail  map[string]error
}

func (f *fakeLoader) LoadAdapter(_ context.Context, ep *Endpoint, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.loads = append(f.loads, ep.Group+":"+name)
	return f.fail[ep.Group]
}

func (f *fakeLoader) got() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.loads...)
}

func TestAdapterRouting(t *testing.T) {
	cat := map[string]int{"sql": 0, "chat": 1}
	b1, b2 := backend(t, "g1", 0), backend(t, "g2", 0)
	e1 := (&Endpoint{Model: "m", Group: "g1", Addr: addr(b1)}).WithAdapters(4, []string{"sql"}, cat)
	e2 := (&Endpoint{Model: "m", Group: "g2", Addr: addr(b2), Running: 3}).WithAdapters(4, nil, cat)
	fl := &fakeLoader{fail: map[string]error{}}
	r := routerOver(Config{Adapters: fl}, e1, e2)
	defer r.Close()
	h := r.Handler()
	body := func(model string) string {
		return `{"model":"` + model + `","messages":[{"role":"user","content":"hi"}]}`
	}

	// Held on g1: routed there, nothing loaded, even though g1 is not the least loaded.
	for i := 0; i < 3; i++ {
		rec := do(t, h, body("sql"), nil)
		require.Equal(t, 200, rec.Code)
		require.Contains(t, rec.Body.String(), "data: g1")
	}
	require.Empty(t, fl.got())

	// Held nowhere: loaded on the replica with the fewest adapters (g2), held, then served there.
	rec := do(t, h, body("chat"), nil)
	require.Equal(t, 200, rec.Code, rec.Body.String())
	require.Contains(t, rec.Body.String(), "data: g2")
	require.Equal(t, []string{"g2:chat"}, fl.got())

	// Unknown: 404 naming it.
	rec = do(t, h, body("nope"), nil)
	require.Equal(t, 404, rec.Code)
	require.Contains(t, errBody(t, rec)["message"], "`nope`")

	// A replica without room sends the router to the next; none with room: 503 saying why.
	fl.fail["g2"] = status.Error(codes.ResourceExhausted, "every adapter slot holds a pinned, busy or requested adapter")
	fl.fail["g1"] = status.Error(codes.ResourceExhausted, "every adapter slot holds a pinned, busy or requested adapter")
	rec = do(t, h, body("chat"), nil)
	require.Equal(t, 503, rec.Code)
	require.Contains(t, errBody(t, rec)["message"], "has no free slot for adapter `chat`")
	require.Equal(t, []string{"g2:chat", "g2:chat", "g1:chat"}, fl.got())

	// A load that fails otherwise: 503 with the head's reason, no second replica tried.
	fl.fail["g2"] = status.Error(codes.FailedPrecondition, "engine refused the load (400): LoRA rank 32 is greater than max_lora_rank 16.")
	rec = do(t, h, body("chat"), nil)
	require.Equal(t, 503, rec.Code)
	require.Contains(t, errBody(t, rec)["message"], "max_lora_rank 16")
	require.Len(t, fl.got(), 4)

	// /v1/models lists the catalog with the base model as parent.
	req := httptest.NewRequest("GET", "/v1/models", nil)
	mrec := httptest.NewRecorder()
	h.ServeHTTP(mrec, req)
	var list struct {
		Data []map[string]any `json:"data"`
	}
	require.NoError(t, json.Unmarshal(mrec.Body.Bytes(), &list))
	parents := map[string]any{}
	for _, c := range list.Data {
		parents[c["id"].(string)] = c["parent"]
	}
	require.Equal(t, "m", parents["sql"])
	require.Equal(t, "m", parents["chat"])
}

// When every replica holding an adapter queues and another is idle, the
// router has one more replica load it, within the adapter's bound; the
// least-request mode loads it wherever the least loaded replica is.
func TestAdapterSpreadAndLeastRequest(t *testing.T) {
	cat := map[string]int{"sql": 0, "one": 1}
	b1, b2 := backend(t, "g1", 0), backend(t, "g2", 0)
	e1 := (&Endpoint{Model: "m", Group: "g1", Addr: addr(b1), Running: 8, Waiting: 4}).WithAdapters(4, []string{"sql", "one"}, cat)
	e2 := (&Endpoint{Model: "m", Group: "g2", Addr: addr(b2)}).WithAdapters(4, nil, cat)
	fl := &fakeLoader{fail: map[string]error{}}
	r := routerOver(Config{Adapters: fl}, e1, e2)
	h := r.Handler()
	rec := do(t, h, `{"model":"sql","messages":[{"role":"user","content":"hi"}]}`, nil)
	require.Contains(t, rec.Body.String(), "data: g1", "served where it is held meanwhile")
	rec = do(t, h, `{"model":"one","messages":[{"role":"user","content":"hi"}]}`, nil)
	require.Contains(t, rec.Body.String(), "data: g1")
	r.Close() // waits for the background load
	require.Equal(t, []string{"g2:sql"}, fl.got(), "spread to the idle replica; `one` is bounded to 1 replica")

	fl = &fakeLoader{fail: map[string]error{}}
	r = routerOver(Config{Adapters: fl, AdapterRouting: AdapterLeastRequest}, e1, e2)
	defer r.Close()
	rec = do(t, r.Handler(), `{"model":"sql","messages":[{"role":"user","content":"hi"}]}`, nil)
	require.Contains(t, rec.Body.String(), "data: g2")
	require.Equal(t, []string{"g2:sql"}, fl.got(), "least-request loads it on the least loaded replica")
}
