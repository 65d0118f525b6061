package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/shoalhq/shoal/internal/kvhash"
	"github.com/stretchr/testify/require"
)

type heard struct {
	mu     sync.Mutex
	events []kvevents.Event
	lost   []uint64
	ch     chan struct{}
}

func (h *heard) Batch(_ uint64, b kvevents.Batch) {
	h.mu.Lock()
	h.events = append(h.events, b.Events...)
	h.mu.Unlock()
	select {
	case h.ch <- struct{}{}:
	default:
	}
}
func (h *heard) Lost(seq uint64, _ bool) { h.mu.Lock(); h.lost = append(h.lost, seq); h.mu.Unlock() }
func (h *heard) Bad(error)               {}

// until waits for an event that ok accepts.
func (h *heard) until(t *testing.T, ok func(kvevents.Event) bool) kvevents.Event {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		h.mu.Lock()
		for _, e := range h.events {
			if ok(e) {
				h.mu.Unlock()
				return e
			}
		}
		h.mu.Unlock()
		select {
		case <-h.ch:
		case <-deadline:
			t.Fatal("no such KV event")
		}
	}
}

// tokenize asks an engine's tokenize endpoint (url) to tokenize body.
func tokenize(t *testing.T, url, body string) (tok struct{ Tokens []uint32 }) {
	t.Helper()
	r, b := post(t, url, body)
	require.Equal(t, 200, r.StatusCode, b)
	require.NoError(t, json.Unmarshal([]byte(b), &tok))
	return tok
}

// withEvents starts an engine (run: VLLM or SGLang) on ip:ports[0] whose
// KV events go to ports[1] (replay ports[2]), and a subscriber to them; it
// returns what the subscriber heard, the engine's URL, and a stop that
// ends both and checks the subscriber ended cleanly.
func withEvents(t *testing.T, run func(context.Context, []string, io.Writer, io.Writer) int, args []string, ip string, ports []int) (*heard, string, func()) {
	t.Helper()
	h := &heard{ch: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	sub := &kvevents.Subscriber{Endpoint: fmt.Sprintf("tcp://%s:%d", ip, ports[1]), Replay: fmt.Sprintf("tcp://%s:%d", ip, ports[2]), Topic: "kv-events"}
	subDone := make(chan error, 1)
	go func() { subDone <- sub.Run(ctx, h) }()
	var out syncBuf
	done := make(chan int, 1)
	srvCtx, stopSrv := context.WithCancel(context.Background())
	go func() { done <- run(srvCtx, args, &out, &out) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		stopSrv()
		<-done
		cancel()
		require.NoError(t, <-subDone)
	}
	t.Cleanup(stop)
	base := fmt.Sprintf("http://%s:%d", ip, ports[0])
	waitHealthy(t, base)
	h.subscribed(t, base)
	return h, base, stop
}

// subscribed returns once the subscriber hears the engine. A ZeroMQ PUB
// socket drops what it publishes before its peer's connection is up (the
// slow joiner), and a subscriber that hears nothing cannot know it missed
// anything; so warm-up prompts (distinct, a few blocks each) go in until
// one's events arrive. What they store stays in the record: tests look for
// their own blocks by name.
func (h *heard) subscribed(t *testing.T, base string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		r, body := post(t, base+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":1}`,
			strings.Repeat(fmt.Sprintf("warm-up prompt %d. ", i), 16)))
		require.Equal(t, 200, r.StatusCode, body)
		select {
		case <-h.ch: // until looks at the record first: no need to signal again
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
	t.Fatal("the subscriber heard no KV event from the engine in 20 s of warm-up prompts")
}

// TestKVEventsMatchTheRoutersHashes runs `vllm serve` with KV events on, as
// the agent starts it, and checks that the blocks it reports storing for a
// prompt are the names a router computes from /tokenize's tokens, that an
// eviction and a cache reset are reported, and that bad settings are refused.
func TestKVEventsMatchTheRoutersHashes(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.05")
	t.Setenv("SHOAL_SIM_TIME_SCALE", "50")
	t.Setenv("PYTHONHASHSEED", "4242")
	t.Setenv("VLLM_SERVER_DEV_MODE", "1")
	ip := "127.0.9.7"
	ports := freePorts(t, ip, 3)
	cfg := fmt.Sprintf(`{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://%s:%d","replay_endpoint":"tcp://%s:%d","topic":"kv-events"}`,
		ip, ports[1], ip, ports[2])
	args := []string{"serve", "/m", "--served-model-name", "m", "--host", ip, "--port", fmt.Sprint(ports[0]),
		"--kv-events-config", cfg, "--prefix-caching-hash-algo", "sha256_cbor", "--block-size", "16"}

	h, base, stop := withEvents(t, VLLM, args, ip, ports)

	prompt := strings.Repeat("The quick brown fox jumps over the lazy dog. ", 20)
	tok := tokenize(t, base+"/tokenize", fmt.Sprintf(`{"model":"m","prompt":%q}`, prompt))
	hasher, err := kvhash.NewVLLM("4242", 16)
	require.NoError(t, err)
	want := hasher.Keys(tok.Tokens, "")
	require.NotEmpty(t, want)
	r, body := post(t, base+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":2}`, prompt))
	require.Equal(t, 200, r.StatusCode, body)
	ev := h.until(t, func(e kvevents.Event) bool { return e.Kind == kvevents.Stored && e.Hashes[0] == want[0] })
	require.Equal(t, want, ev.Hashes, "the engine's block names are the router's")
	require.False(t, ev.HasParent)
	require.Equal(t, 16, ev.BlockSize)
	require.Equal(t, tok.Tokens[:16*len(want)], ev.Tokens)
	require.Equal(t, "GPU", ev.Medium)

	// The same text under a chat template is another prompt; /tokenize
	// renders it the engine's way too.
	chat := tokenize(t, base+"/tokenize", fmt.Sprintf(`{"model":"m","messages":[{"role":"user","content":%q}]}`, prompt))
	r, body = post(t, base+"/v1/chat/completions", fmt.Sprintf(`{"model":"m","messages":[{"role":"user","content":%q}],"max_tokens":2}`, prompt))
	require.Equal(t, 200, r.StatusCode, body)
	wantChat := hasher.Keys(chat.Tokens, "")
	ev = h.until(t, func(e kvevents.Event) bool { return e.Kind == kvevents.Stored && e.Hashes[0] == wantChat[0] })
	require.Equal(t, wantChat, ev.Hashes)

	resp, err := http.Post(base+"/reset_prefix_cache", "application/json", nil)
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	h.until(t, func(e kvevents.Event) bool { return e.Kind == kvevents.Cleared })
	h.mu.Lock()
	require.Empty(t, h.lost)
	h.mu.Unlock()
	stop()

	for _, bad := range []struct{ arg, want string }{
		{`{"enable_kv_cache_events":true,"endpoints":"x"}`, `unknown field "endpoints"`},
		{`{"enable_kv_cache_events":true,"publisher":"kafka"}`, "Input should be 'null' or 'zmq'"},
		{`not json`, "validation error for KVEventsConfig"},
	} {
		_, err := parseServe([]string{"/m", "--kv-events-config", bad.arg})
		require.ErrorContains(t, err, bad.want)
	}
	_, err = parseServe([]string{"/m", "--prefix-caching-hash-algo", "md5"})
	require.ErrorContains(t, err, "invalid choice: 'md5' (choose from 'sha256', 'sha256_cbor', 'xxhash', 'xxhash_cbor')")
	c, err := parseServe([]string{"/m", "--kv-events-config", `{"enable_kv_cache_events":false}`})
	require.NoError(t, err)
	require.Nil(t, c.kvEvents, "events off: no publisher")
}

// TestEvictionIsReported: a KV cache too small for two prompts evicts the
// first one's blocks, and says so.
func TestEvictionIsReported(t *testing.T) {
	p := DefaultParams()
	p.NumGPUBlocks, p.BlockSize = 40, 16
	v := NewVirtual(p, "7")
	a := strings.Repeat("a", 4*16*30)
	b := strings.Repeat("b", 4*16*30)
	var all []kvevents.Event
	for _, prompt := range []string{a, b} {
		v.Submit(v.Now(), prompt, 1)
		for v.Busy() {
			_, _, evs := v.Step()
			all = append(all, evs...)
		}
	}
	_, first := v.e.name(a)
	var stored, removed []uint64
	for _, e := range all {
		switch e.Kind {
		case kvevents.Stored:
			stored = append(stored, e.Hashes...)
		case kvevents.Removed:
			removed = append(removed, e.Hashes...)
		}
	}
	require.Subset(t, stored, first)
	require.NotEmpty(t, removed)
	require.Subset(t, first, removed, "what was evicted was the first prompt's")
}

// TestSGLangKVEvents runs `python3 -m sglang.launch_server` with KV events
// on, as the agent starts it: each cached page is one BlockStored, named by
// SGLang's page chain over /tokenize's tokens and chained to the page
// before it, in SGLang's positional encoding; /tokenize takes no chat
// messages; the events are off without the zmq publisher or with the radix
// cache off, and bad settings are refused.
func TestSGLangKVEvents(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.05")
	t.Setenv("SHOAL_SIM_TIME_SCALE", "50")
	ip := "127.0.9.8"
	ports := freePorts(t, ip, 3)
	cfg := fmt.Sprintf(`{"publisher":"zmq","endpoint":"tcp://%s:%d","replay_endpoint":"tcp://%s:%d","topic":"kv-events"}`, ip, ports[1], ip, ports[2])
	args := []string{"--model-path", "/m", "--served-model-name", "m", "--host", ip, "--port", fmt.Sprint(ports[0]),
		"--kv-events-config", cfg, "--page-size", "16"}

	h, base, stop := withEvents(t, SGLang, args, ip, ports)

	prompt := strings.Repeat("The quick brown fox jumps over the lazy dog. ", 20)
	tok := tokenize(t, base+"/v1/tokenize", fmt.Sprintf(`{"model":"m","prompt":%q}`, prompt))
	namer, err := kvhash.NewSGLang(16)
	require.NoError(t, err)
	want := namer.Keys(tok.Tokens, "")
	require.Greater(t, len(want), 2)
	r, body := post(t, base+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":2}`, prompt))
	require.Equal(t, 200, r.StatusCode, body)
	for i, name := range want {
		ev := h.until(t, func(e kvevents.Event) bool { return e.Kind == kvevents.Stored && e.Hashes[0] == name })
		require.Len(t, ev.Hashes, 1, "one event per page")
		require.Equal(t, i > 0, ev.HasParent)
		if i > 0 {
			require.Equal(t, want[i-1], ev.Parent, "chained to the page before")
		}
		require.Equal(t, 16, ev.BlockSize)
		require.Equal(t, tok.Tokens[16*i:16*(i+1)], ev.Tokens)
	}
	r, body = post(t, base+"/tokenize", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, 400, r.StatusCode, "SGLang's /tokenize has no chat messages: %s", body)
	stop()

	parse := func(extra ...string) (serveConfig, error) {
		fs := newFlagSet("launch_server.py", sglangValued, sglangBools, nil)
		if err := fs.parse(append([]string{"--model-path", "/m"}, extra...)); err != nil {
			return serveConfig{}, err
		}
		var c serveConfig
		return c, parseSGLangKVEvents(fs, &c)
	}
	c, err := parse("--kv-events-config", `{"publisher":"zmq","unknown_field":1}`)
	require.NoError(t, err, "pydantic ignores fields it does not know")
	require.Equal(t, kvhash.AlgoSGLangPage, c.hashAlgo)
	require.Equal(t, 1, c.blockSize, "SGLang's default page size")
	c, err = parse("--kv-events-config", `{"publisher":"null"}`)
	require.NoError(t, err)
	require.Nil(t, c.kvEvents)
	c, err = parse("--kv-events-config", `{"publisher":"zmq"}`, "--disable-radix-cache")
	require.NoError(t, err)
	require.Nil(t, c.kvEvents, "no radix cache, no events")
	_, err = parse("--kv-events-config", `{"publisher":"zmq","hwm":"lots"}`)
	require.ErrorContains(t, err, "validation error for KVEventsConfig")
	_, err = parse("--page-size", "0")
	require.ErrorContains(t, err, "--page-size must be a positive integer")
}
