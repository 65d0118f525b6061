package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// pdEngine is an engine with a NixlConnector whose side channel is on ip.
func pdEngine(t *testing.T, ip, policy string, lease float64) (*Server, string) {
	t.Helper()
	cfg, err := parseKVTransfer(fmt.Sprintf(`{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":%q,"kv_connector_extra_config":{"kv_lease_duration":%v}}`, policy, lease))
	require.NoError(t, err)
	p := Presets["llama-8b-h100-tp1"]
	s, url := testServer(t, p.Params, 50)
	port := freePorts(t, ip, 1)[0]
	s.nixl, err = listenNIXL(cfg, ip, port, 1, p, Clock{Scale: 50}, s.eng.m)
	require.NoError(t, err)
	t.Cleanup(s.nixl.close)
	return s, url
}

func kvUsage(s *Server) float64 {
	s.eng.mu.Lock()
	defer s.eng.mu.Unlock()
	return s.eng.kv.usage()
}

// The two hops of vLLM's NIXL proxy protocol, by hand: P computes the
// prompt and answers with kv_transfer_params, holding the blocks; D gets
// the original request with them, pulls the blocks (a prefix-cache hit on
// D) and decodes; P's blocks are free once pulled. A second pull of the
// same blocks, or one after the lease, fails by the load-failure policy.
func TestNIXLTwoHop(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "5")
	ps, pURL := pdEngine(t, "127.0.9.20", "fail", 30)
	ds, dURL := pdEngine(t, "127.0.9.21", "fail", 30)
	prompt := strings.Repeat("the quick brown fox jumps over the lazy dog ", 40)
	first := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}}`, prompt)
	resp, body := post(t, pURL+"/v1/completions", first)
	require.Equal(t, 200, resp.StatusCode, body)
	var pr struct {
		KV map[string]any `json:"kv_transfer_params"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &pr))
	require.Equal(t, true, pr.KV["do_remote_prefill"])
	require.Equal(t, false, pr.KV["do_remote_decode"])
	require.Equal(t, "127.0.9.20", pr.KV["remote_host"], "P advertises its side channel's host")
	require.Equal(t, ps.nixl.engineID, pr.KV["remote_engine_id"])
	require.NotEmpty(t, pr.KV["remote_block_ids"])
	require.Positive(t, kvUsage(ps), "P holds the blocks for D")

	kv, _ := json.Marshal(pr.KV)
	second := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":8,"ignore_eos":true,"kv_transfer_params":%s}`, prompt, kv)
	resp, body = post(t, dURL+"/v1/completions", second)
	require.Equal(t, 200, resp.StatusCode, body)
	require.Zero(t, kvUsage(ps), "pulled: P's blocks are free")
	hits := counterValue(ds.eng.m.prefixH)
	require.Greater(t, hits, float64(len(pr.KV["remote_block_ids"].([]any))*15), "D found the pulled prompt in its cache")

	// The same blocks again: P no longer holds them.
	resp, body = post(t, dURL+"/v1/completions", second)
	require.Equal(t, 500, resp.StatusCode)
	require.Contains(t, body, "no KV blocks held")
}

// The lazy handshake is paid on a pair's first transfer only; the transfer
// itself costs the KV's bytes over the link.
func TestNIXLHandshakeOncePerPair(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "5")
	t.Setenv("SHOAL_SIM_KV_GBPS", "50")
	ps, _ := pdEngine(t, "127.0.9.22", "fail", 30)
	ds, _ := pdEngine(t, "127.0.9.23", "fail", 30)
	pull := func() time.Duration {
		d, err := ds.nixl.pull(context.Background(), heldRequest(ps), 4096)
		require.NoError(t, err)
		return d
	}
	kvBytes, gbps := float64(4096*(128<<10)), 50.0
	bytes := time.Duration(kvBytes / (gbps * 1e9) * float64(time.Second))
	require.Equal(t, 5*time.Second+bytes, pull(), "first transfer: handshake + bytes")
	require.Equal(t, bytes, pull(), "the pair is warm")
}

// A lease that runs out frees P's blocks; D then fails the request, or
// with kv_load_failure_policy recompute prefills it itself.
func TestNIXLLeaseAndRecompute(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "0")
	ps, pURL := pdEngine(t, "127.0.9.24", "fail", 1) // 1 s virtual: 20 ms real
	_, dFail := pdEngine(t, "127.0.9.25", "fail", 30)
	_, dRecompute := pdEngine(t, "127.0.9.26", "recompute", 30)
	prompt := strings.Repeat("lorem ipsum dolor sit amet ", 30)
	resp, body := post(t, pURL+"/v1/completions", fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":1,"kv_transfer_params":{"do_remote_decode":true}}`, prompt))
	require.Equal(t, 200, resp.StatusCode, body)
	var pr struct {
		KV json.RawMessage `json:"kv_transfer_params"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &pr))
	require.Eventually(t, func() bool { return kvUsage(ps) == 0 }, 5*time.Second, 5*time.Millisecond, "the lease frees P's blocks")
	require.Equal(t, 1.0, counterValue(ps.nixl.m.expired), "vllm:nixl_num_kv_expired_reqs counts it")
	second := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":4,"kv_transfer_params":%s}`, prompt, pr.KV)
	resp, body = post(t, dFail+"/v1/completions", second)
	require.Equal(t, 500, resp.StatusCode)
	require.Contains(t, body, "kv_load_failure_policy=fail")
	resp, body = post(t, dRecompute+"/v1/completions", second)
	require.Equal(t, 200, resp.StatusCode, "recompute: D prefills it: %s", body)
}

func TestKVTransferConfigRefusals(t *testing.T) {
	for cfg, want := range map[string]string{
		`{"kv_connector":"P2pNcclConnector","kv_role":"kv_both"}`:                           "NixlConnector only",
		`{"kv_connector":"NixlConnector","kv_role":"kv_sideways"}`:                          "Unsupported kv_role",
		`{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"x"}`: "kv_load_failure_policy",
		`{"kv_role":"kv_both"}`: "kv_connector is required",
		`{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_connector_extra_config":{"kv_lease_duration":-1}}`: "kv_lease_duration",
		`not json`: "invalid KVTransferConfig",
	} {
		_, err := parseServe([]string{"/m", "--kv-transfer-config", cfg})
		require.ErrorContains(t, err, want, cfg)
	}
	c, err := parseServe([]string{"/m", "--kv-transfer-config", `{"kv_connector":"NixlConnector","kv_role":"kv_both"}`})
	require.NoError(t, err)
	require.Equal(t, "fail", c.kvTransfer.FailurePolicy, "vLLM's default since 0.17")
	require.Equal(t, 30*time.Second, c.kvTransfer.lease)
}

// heldRequest puts three cached blocks on P and holds them for a pull.
func heldRequest(ps *Server) *kvTransferParams {
	r := &request{hashes: []uint64{1, 2, 3}}
	ps.eng.mu.Lock()
	for _, h := range r.hashes {
		id := ps.eng.kv.alloc()
		ps.eng.kv.register(id, h)
		ps.eng.kv.release(id)
	}
	ps.eng.mu.Unlock()
	return ps.nixl.hold(ps.eng, r, fmt.Sprint(time.Now().UnixNano()))
}

// P keeps the blocks while D reads them and frees them on D's
// notification; P going away mid-read fails D's transfer, counted in
// vllm:nixl_num_failed_transfers.
func TestNIXLBlocksHeldUntilRead(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "0")
	t.Setenv("SHOAL_SIM_KV_GBPS", "0.05") // 4096 tokens × 128 KiB: ~10.7 s virtual, ~215 ms real
	ps, _ := pdEngine(t, "127.0.9.27", "fail", 30)
	ds, _ := pdEngine(t, "127.0.9.28", "fail", 30)
	kv := heldRequest(ps)
	done := make(chan error, 1)
	go func() { _, err := ds.nixl.pull(context.Background(), kv, 4096); done <- err }()
	require.Never(t, func() bool { return kvUsage(ps) == 0 }, 100*time.Millisecond, 5*time.Millisecond, "held while D reads")
	require.NoError(t, <-done)
	require.Zero(t, kvUsage(ps), "freed by D's notification")
	require.Zero(t, counterValue(ds.nixl.m.failed))
	// P drops the first pull's connection on its own time: wait, or "D
	// connected" below could see that one and kill P before D dials again.
	require.Eventually(t, func() bool { return ps.nixl.side.open() == 0 }, 5*time.Second, time.Millisecond, "the first pull's connection closed")

	kv = heldRequest(ps)
	go func() { _, err := ds.nixl.pull(context.Background(), kv, 40960); done <- err }() // ~2 s real
	require.Eventually(t, func() bool {
		return ps.nixl.side.open() > 0
	}, 5*time.Second, time.Millisecond, "D connected")
	ps.nixl.close() // P dies while D reads
	err := <-done
	require.ErrorContains(t, err, "the prefill engine")
	require.Equal(t, 1.0, counterValue(ds.nixl.m.failed))
}

// A decode request that goes away during the handshake tells P to free
// its blocks, not waiting for the lease.
func TestNIXLCancelledPullFreesPrefill(t *testing.T) {
	t.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "50") // 1 s real at Scale 50
	ps, _ := pdEngine(t, "127.0.9.29", "fail", 300)
	ds, _ := pdEngine(t, "127.0.9.30", "fail", 300)
	kv := heldRequest(ps)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := ds.nixl.pull(ctx, kv, 64); done <- err }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
	require.Eventually(t, func() bool { return kvUsage(ps) == 0 }, 2*time.Second, 5*time.Millisecond, "P freed the blocks on D's abort")
	require.Zero(t, counterValue(ds.nixl.m.failed), "a cancelled request is not a failed transfer")
}
