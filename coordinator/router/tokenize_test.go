package router

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/shoalhq/shoal/internal/kvhash"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
)

// tokenizingEngine answers /tokenize with one token per byte of the prompt
// (or fails, while fail is set), records what it was asked, and answers
// anything else 200.
type tokenizingEngine struct {
	mu    sync.Mutex
	asked []map[string]any
	fail  bool
}

func (e *tokenizingEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	if r.URL.Path != "/tokenize" {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"choices":[]}`))
		return
	}
	var req map[string]any
	_ = json.Unmarshal(b, &req)
	e.mu.Lock()
	e.asked = append(e.asked, req)
	fail := e.fail
	e.mu.Unlock()
	if fail {
		http.Error(w, `{"error":"boom"}`, 500)
		return
	}
	p, _ := req["prompt"].(string)
	toks := make([]int, len(p))
	for i := range toks {
		toks[i] = int(p[i])
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"count": len(toks), "tokens": toks})
}

func (e *tokenizingEngine) requests() []map[string]any {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]map[string]any(nil), e.asked...)
}

// tokenizeRouter is a router in front of one tokenizingEngine, with a KV
// index the test fills, and a sender of requests with a strategy.
func tokenizeRouter(t *testing.T) (*tokenizingEngine, *Endpoint, *KVIndex, *Router, func(path, body, strategy string) int) {
	eng := &tokenizingEngine{}
	srv := httptest.NewServer(eng)
	t.Cleanup(srv.Close)
	ep := &Endpoint{Model: "m", Addr: addr(srv), Group: "g"}
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, []*Endpoint{ep}))
	kv := NewKVIndex(0)
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{KV: kv})
	send := func(path, body, strategy string) int {
		req := httptest.NewRequest("POST", path, strings.NewReader(body))
		req.Header.Set("Routing-Strategy", strategy)
		rec := httptest.NewRecorder()
		r.Handler().ServeHTTP(rec, req)
		return rec.Code
	}
	return eng, ep, kv, r, send
}

// TestPrefixCacheTokenizesAtTheEngine: with a replica that sends KV events,
// a prefix-cache request's prompt is tokenized by the engine (completion
// text as is; chat messages with what shapes the chat template; token ids
// need no call), and a failed /tokenize is counted and leaves the pick to the
// estimate. Without events, or for another strategy, nothing is asked.
func TestPrefixCacheTokenizesAtTheEngine(t *testing.T) {
	eng, ep, kv, r, send := tokenizeRouter(t)
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":"hello"}`, StrategyPrefixCache))
	require.Empty(t, eng.requests(), "no replica sends events: nothing to match tokens against")

	kv.Reset(ep.Addr, vllmHasher(t), nil, 0)
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":"hello"}`, StrategyPrefixCache))
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":[1,2,3]}`, StrategyPrefixCache))
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":["a","b"]}`, StrategyPrefixCache))
	require.Equal(t, 200, send("/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[],"temperature":0}`, StrategyPrefixCache))
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":"hello"}`, StrategyLeastRequest))
	got := eng.requests()
	require.Len(t, got, 2, "token ids and a batch of prompts need no call; other strategies none: %v", got)
	require.Equal(t, map[string]any{"model": "m", "prompt": "hello"}, got[0])
	require.Equal(t, map[string]any{"model": "m", "messages": []any{map[string]any{"role": "user", "content": "hi"}},
		"tools": []any{}, "add_generation_prompt": true}, got[1], "the chat template's inputs, not the sampling ones")

	eng.mu.Lock()
	eng.fail = true
	eng.mu.Unlock()
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":"hello"}`, StrategyPrefixCache), "the estimate decides")
	require.Equal(t, 1.0, testutil.ToFloat64(r.tokenizeFailures))
}

// An SGLang replica's /tokenize takes a completion prompt but no chat
// messages: its chats are not sent to be tokenized (the estimate decides),
// its completions are.
func TestSGLangChatsAreNotTokenized(t *testing.T) {
	eng, ep, kv, r, send := tokenizeRouter(t)
	sg, err := kvhash.NewSGLang(16)
	require.NoError(t, err)
	kv.Reset(ep.Addr, sg, nil, 0)
	require.Equal(t, 200, send("/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`, StrategyPrefixCache))
	require.Equal(t, 200, send("/v1/completions", `{"model":"m","prompt":"hello"}`, StrategyPrefixCache))
	require.Equal(t, []map[string]any{{"model": "m", "prompt": "hello"}}, eng.requests(), "the completion only")
	require.Zero(t, testutil.ToFloat64(r.tokenizeFailures), "nothing failed: the chat was never asked")
}

func TestTokenIDs(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want []uint32
		ok   bool
	}{
		{`[1,2,4294967295]`, []uint32{1, 2, 4294967295}, true},
		{`[]`, nil, true},
		{`[1.5]`, nil, false},
		{`[1e3]`, nil, false},
		{`[-1]`, nil, false},
		{`[4294967296]`, nil, false},
		{`["1"]`, nil, false},
		{`{"a":1}`, nil, false},
	} {
		got, ok := tokenIDs(gjson.Parse(tc.raw))
		require.Equal(t, tc.ok, ok, tc.raw)
		if ok {
			require.Equal(t, tc.want, got, tc.raw)
		}
	}
}
