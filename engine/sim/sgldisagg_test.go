package sim

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// sglPD is a simulated SGLang engine in disaggregation mode; a prefill
// engine's bootstrap server listens on ip.
func sglPD(t *testing.T, ip, mode string) (*Server, string, int) {
	t.Helper()
	p := Presets["llama-8b-h100-tp1"]
	s, url := testServer(t, p.Params, 50)
	port := freePorts(t, ip, 1)[0]
	require.NoError(t, s.EnableSGLangDisagg(p, mode, ip, port))
	t.Cleanup(s.Close)
	return s, url, port
}

func TestSGLangDisaggFlags(t *testing.T) {
	for args, want := range map[string]string{
		"--disaggregation-mode both":             "invalid choice: 'both'",
		"--disaggregation-transfer-backend ucx":  "invalid choice: 'ucx'",
		"--disaggregation-transfer-backend fake": "mooncake and nixl",
	} {
		fs := newFlagSet("launch_server.py", sglangValued, sglangBools, nil)
		require.NoError(t, fs.parse(append([]string{"--model-path", "/m", "--disaggregation-mode", "prefill"}, strings.Fields(args)...)))
		_, err := parseSGLDisagg(fs)
		require.ErrorContains(t, err, want, args)
	}
}

// Both engines get the request at once; the decode engine waits at the
// prefill engine's bootstrap server for the room's KV, the prefill engine
// answers once the decode engine has read it, and the decode engine
// computes only what the whole blocks it received lack. A request without
// the bootstrap fields is refused by both modes; the fake bootstrap host
// runs without a peer.
func TestSGLangDisaggTwoEngines(t *testing.T) {
	ps, pURL, port := sglPD(t, "127.0.9.50", "prefill")
	ds, dURL, _ := sglPD(t, "127.0.9.51", "decode")
	prompt := strings.Repeat("the quick brown fox jumps over the lazy dog ", 40)
	body := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":8,"ignore_eos":true,"bootstrap_host":"127.0.9.50","bootstrap_port":%d,"bootstrap_room":42}`, prompt, port)
	type res struct {
		code int
		body string
	}
	pc := make(chan res, 1)
	go func() { r, b := post(t, pURL+"/v1/completions", body); pc <- res{r.StatusCode, b} }()
	r, b := post(t, dURL+"/v1/completions", body)
	require.Equal(t, 200, r.StatusCode, b)
	require.Contains(t, b, `"completion_tokens":8`, "the decode engine decodes the answer")
	pr := <-pc
	require.Equal(t, 200, pr.code, pr.body)
	require.Contains(t, pr.body, `"completion_tokens":1`, "the prefill engine computes the prompt and one token")
	require.Less(t, counterValue(ds.eng.m.prompt), 20.0, "the decode engine computed only the prompt's last partial block")
	require.Greater(t, counterValue(ps.eng.m.prompt), 300.0)
	require.Zero(t, kvUsage(ps), "the prefill engine freed the KV once read")

	for _, u := range []string{pURL, dURL} {
		r, b := post(t, u+"/v1/completions", `{"model":"m","prompt":"hi","max_tokens":1}`)
		require.Equal(t, 400, r.StatusCode)
		require.Contains(t, b, "needs bootstrap_host, bootstrap_port and bootstrap_room")
		r, b = post(t, u+"/v1/completions", `{"model":"m","prompt":"hi","max_tokens":1,"bootstrap_host":"2.2.2.2","bootstrap_port":8998,"bootstrap_room":0}`)
		require.Equal(t, 200, r.StatusCode, "the fake bootstrap host needs no peer: %s", b)
	}
}

// A decode engine whose prefill engine is gone, or never fills the room,
// fails the request with a KVTransferError; a prefill engine whose room no
// decode engine takes gives up after SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT
// and frees the KV.
func TestSGLangDisaggFailures(t *testing.T) {
	t.Setenv("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "5") // 100 ms real
	ps, pURL, port := sglPD(t, "127.0.9.52", "prefill")
	_, dURL, _ := sglPD(t, "127.0.9.53", "decode")
	r, b := post(t, pURL+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":4,"bootstrap_host":"127.0.9.52","bootstrap_port":%d,"bootstrap_room":7}`,
		strings.Repeat("lonely prefill ", 30), port))
	require.Equal(t, 500, r.StatusCode)
	require.Contains(t, b, "no decode engine took the KV")
	require.Zero(t, kvUsage(ps), "freed when no decode engine came")

	r, b = post(t, dURL+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":"x","max_tokens":4,"bootstrap_host":"127.0.9.52","bootstrap_port":%d,"bootstrap_room":7}`, port))
	require.Equal(t, 500, r.StatusCode)
	require.Contains(t, b, "already handed over or timed out", "a late decode engine is told, not left waiting")

	r, b = post(t, dURL+"/v1/completions", `{"model":"m","prompt":"x","max_tokens":4,"bootstrap_host":"127.0.9.59","bootstrap_port":1,"bootstrap_room":8}`)
	require.Equal(t, 500, r.StatusCode)
	require.Contains(t, b, "KVTransferError(bootstrap_room=8): could not reach the bootstrap server")

	// The prefill engine dies while the decode engine waits for the room.
	done := make(chan string, 1)
	go func() {
		_, b := post(t, dURL+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":"x","max_tokens":4,"bootstrap_host":"127.0.9.52","bootstrap_port":%d,"bootstrap_room":9}`, port))
		done <- b
	}()
	require.Eventually(t, func() bool { // the decode engine registered room 9 (an older connection may still be open)
		ps.sgl.mu.Lock()
		defer ps.sgl.mu.Unlock()
		_, ok := ps.sgl.rooms[9]
		return ok
	}, 5*time.Second, time.Millisecond)
	ps.Close()
	select {
	case b := <-done:
		require.Contains(t, b, "went away before sending the KV")
	case <-time.After(5 * time.Second):
		t.Fatal("the decode engine kept waiting for a dead prefill engine")
	}
}

// A decode engine's first transfer from a prefill engine pays the
// backend's connection set-up (nixl: NIXL's lazy handshake; mooncake:
// SHOAL_SIM_MOONCAKE_HANDSHAKE_SECONDS, none by default); later transfers
// from the same prefill engine pay only the KV's bytes.
func TestSGLangDisaggFirstTransferPaysTheHandshake(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "5")
	clock := Clock{Scale: 1000}
	pr := Presets["llama-8b-h100-tp1"]
	bytes := kvTransferTime(1000, pr.KVBytesPerToken, 3) // TCP: no --disaggregation-ib-device
	for i, c := range []struct {
		backend string
		first   time.Duration
	}{{"nixl", 5 * time.Second}, {"mooncake", 0}} {
		ip := fmt.Sprintf("127.0.9.%d", 54+i)
		port := freePorts(t, ip, 1)[0]
		p, err := startSGLDisagg(&sglDisaggConfig{mode: "prefill", backend: c.backend, bootstrapPort: port}, ip, pr, clock)
		require.NoError(t, err)
		t.Cleanup(p.close)
		d, err := startSGLDisagg(&sglDisaggConfig{mode: "decode", backend: c.backend}, ip, pr, clock)
		require.NoError(t, err)
		for room, want := range []time.Duration{c.first + bytes, bytes, bytes} {
			p.mu.Lock() // P has the room's KV (no engine: nothing to free)
			r := p.roomLocked(uint64(room))
			r.readyAt = true
			close(r.ready)
			p.mu.Unlock()
			got, err := d.receive(t.Context(), ip, port, uint64(room), 1000)
			require.NoError(t, err, c.backend)
			require.Equal(t, want, got, "%s: transfer %d", c.backend, room)
		}
	}
}

// A decode engine waiting on a prefill engine that hangs (its bootstrap
// server takes connections and answers nothing) fails the request after
// SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE probes in a row fail, long
// before the waiting timeout; one that is only slow to fill the room, but
// answers the probes, is waited for.
func TestSGLangDisaggHeartbeat(t *testing.T) {
	t.Setenv("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", "100000") // 2,000 s real: the heartbeat must end it
	clock := Clock{Scale: 50}                                   // a 5 s interval (and a probe's limit) is 100 ms
	pr := Presets["llama-8b-h100-tp1"]
	d, err := startSGLDisagg(&sglDisaggConfig{mode: "decode", backend: "mooncake"}, "127.0.9.56", pr, clock)
	require.NoError(t, err)

	hung, err := net.Listen("tcp", "127.0.9.56:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = hung.Close() })
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := hung.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			_ = c.Close()
		}
	})
	port := hung.Addr().(*net.TCPAddr).Port
	_, err = d.receive(t.Context(), "127.0.9.56", port, 7, 1000)
	require.ErrorContains(t, err, fmt.Sprintf("KVTransferError(bootstrap_room=7): Losing connection with prefill instance (bootstrap_addr: 127.0.9.56:%d): 2 heartbeats failed in a row", port))

	port = freePorts(t, "127.0.9.57", 1)[0]
	p, err := startSGLDisagg(&sglDisaggConfig{mode: "prefill", backend: "mooncake", bootstrapPort: port}, "127.0.9.57", pr, clock)
	require.NoError(t, err)
	t.Cleanup(p.close)
	fill := time.AfterFunc(600*time.Millisecond, func() { // six heartbeat intervals
		p.mu.Lock()
		defer p.mu.Unlock()
		r := p.roomLocked(8)
		r.readyAt = true
		close(r.ready)
	})
	defer fill.Stop()
	_, err = d.receive(t.Context(), "127.0.9.57", port, 8, 1000)
	require.NoError(t, err, "a slow prefill engine that answers the probes is waited for")
}
