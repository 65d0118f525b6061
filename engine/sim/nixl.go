package sim

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Prefill/decode disaggregation over vLLM's NixlConnector, as a proxy drives
// it (docs/design/pd.md): the prefill engine (P) gets the request with
// kv_transfer_params {do_remote_decode: true}, computes the prompt, keeps
// its KV blocks for the decode engine under a lease, and answers with the
// kv_transfer_params the decode engine (D) needs; D gets the original
// request with those, pulls the blocks over P's side channel — paying the
// connector's lazy handshake on a pair's first transfer and the KV's bytes
// over the link — and decodes. A pull that finds the blocks gone (P
// restarted, the lease ran out) fails the request or, with
// kv_load_failure_policy "recompute", prefills it on D.

// kvTransferConfig is --kv-transfer-config.
type kvTransferConfig struct {
	Connector     string         `json:"kv_connector"`
	Role          string         `json:"kv_role"`
	FailurePolicy string         `json:"kv_load_failure_policy"`
	Extra         map[string]any `json:"kv_connector_extra_config"`
	lease         time.Duration
}

// parseKVTransfer reads --kv-transfer-config; nil without it.
func parseKVTransfer(s string) (*kvTransferConfig, error) {
	if s == "" {
		return nil, nil
	}
	var c kvTransferConfig
	dec := json.NewDecoder(strings.NewReader(s))
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("vllm serve: error: argument --kv-transfer-config: invalid KVTransferConfig value: %v", err)
	}
	switch c.Connector {
	case "NixlConnector":
	case "":
		return nil, fmt.Errorf("ValueError: kv_connector is required in --kv-transfer-config")
	default:
		return nil, fmt.Errorf("ValueError: the simulator models NixlConnector only, got kv_connector %q", c.Connector)
	}
	switch c.Role {
	case "kv_both", "kv_producer", "kv_consumer":
	default:
		return nil, fmt.Errorf("ValueError: Unsupported kv_role: %s. Supported roles are ['kv_producer', 'kv_consumer', 'kv_both']", c.Role)
	}
	switch c.FailurePolicy {
	case "":
		c.FailurePolicy = "fail" // vLLM's default since 0.17
	case "fail", "recompute":
	default:
		return nil, fmt.Errorf("ValueError: kv_load_failure_policy must be 'fail' or 'recompute', got %q", c.FailurePolicy)
	}
	c.lease = 30 * time.Second
	if v, ok := c.Extra["kv_lease_duration"]; ok {
		f, ok := v.(float64)
		if !ok || f <= 0 {
			return nil, fmt.Errorf("ValueError: kv_connector_extra_config.kv_lease_duration must be a positive number of seconds, got %v", v)
		}
		c.lease = time.Duration(f * float64(time.Second))
	}
	return &c, nil
}

// kvTransferParams is the request and response field the proxy carries
// between P and D.
type kvTransferParams struct {
	DoRemoteDecode  bool    `json:"do_remote_decode"`
	DoRemotePrefill bool    `json:"do_remote_prefill"`
	RemoteEngineID  *string `json:"remote_engine_id"`
	RemoteBlockIDs  []int   `json:"remote_block_ids"`
	RemoteRequestID *string `json:"remote_request_id,omitempty"`
	RemoteHost      *string `json:"remote_host"`
	RemotePort      *int    `json:"remote_port"`
	TPSize          int     `json:"tp_size,omitempty"`
}

// nixl is one engine process's connector: P's side channel and holds, D's
// pulls and handshakes.
type nixl struct {
	cfg       *kvTransferConfig
	engineID  string
	host      string // VLLM_NIXL_SIDE_CHANNEL_HOST: what P binds and advertises
	port      int
	tp        int
	clock     Clock
	bytesTok  int64   // KV bytes per token
	gbps      float64 // link bandwidth, GB/s
	handshake time.Duration
	side      *sideChannel
	m         *nixlMetrics

	mu     sync.Mutex
	holds  map[string]*kvHold // P: request id → its blocks
	paired map[string]bool    // D: remote engines handshaken
}

// kvHold is P's blocks of one request, kept for D until pulled or expired.
type kvHold struct {
	eng   *Engine
	ids   []int
	timer *time.Timer
}

// startNIXL binds P's side channel (every NixlConnector engine has one:
// vLLM's kv_both engines serve either role) on VLLM_NIXL_SIDE_CHANNEL_HOST
// (default localhost, so another host cannot reach it: cross-host PD needs
// it set) and VLLM_NIXL_SIDE_CHANNEL_PORT + the first DP rank.
func startNIXL(cfg *kvTransferConfig, c serveConfig, pr Preset, clock Clock, rank int, m *metrics) (*nixl, error) {
	host := os.Getenv("VLLM_NIXL_SIDE_CHANNEL_HOST")
	if host == "" {
		host = "localhost"
	}
	return listenNIXL(cfg, host, envInt("VLLM_NIXL_SIDE_CHANNEL_PORT", 5600)+rank, c.tp, pr, clock, m)
}

// listenNIXL starts a connector whose side channel is host:port; its
// series go on m's registry.
func listenNIXL(cfg *kvTransferConfig, host string, port, tp int, pr Preset, clock Clock, m *metrics) (*nixl, error) {
	var id [16]byte
	_, _ = rand.Read(id[:])
	n := &nixl{cfg: cfg, engineID: hex.EncodeToString(id[:]), host: host, port: port, m: m.enableNIXL(),
		tp: tp, clock: clock, bytesTok: pr.KVBytesPerToken, holds: map[string]*kvHold{}, paired: map[string]bool{},
		handshake: time.Duration(envFloat("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", 5) * float64(time.Second))}
	if n.bytesTok == 0 {
		n.bytesTok = 128 << 10
	}
	// Over RDMA (UCX told HCA ports) a NIC's 400 Gb/s; else TCP.
	n.gbps = envFloat("SHOAL_SIM_KV_GBPS", map[bool]float64{true: 50, false: 3}[ucxRDMA()])
	side, err := listenSide(net.JoinHostPort(n.host, strconv.Itoa(n.port)))
	if err != nil {
		return nil, fmt.Errorf("zmq.error.ZMQError: Address already in use (NIXL side channel %s:%d): %v", n.host, n.port, err)
	}
	n.side = side
	go side.serve(n.answer)
	return n, nil
}

func (n *nixl) close() {
	if n == nil {
		return
	}
	n.side.close() // the process is gone: so are its sockets
	n.mu.Lock()
	defer n.mu.Unlock()
	for id, h := range n.holds {
		h.timer.Stop()
		n.releaseLocked(id)
	}
}

// hold keeps the full prompt blocks of r (finished on eng) for D until
// pulled or the lease ends, and returns the params D needs.
func (n *nixl) hold(eng *Engine, r *request, requestID string) *kvTransferParams {
	ids := eng.holdPrompt(r.hashes)
	n.mu.Lock()
	n.holds[requestID] = &kvHold{eng: eng, ids: ids, timer: time.AfterFunc(n.clock.Real(n.cfg.lease), func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		if _, ok := n.releaseLocked(requestID); ok { // the lease ran out: D never pulled
			n.m.expired.Inc()
		}
	})}
	n.mu.Unlock()
	host, port, eid, rid := n.host, n.port, n.engineID, requestID
	return &kvTransferParams{DoRemotePrefill: true, RemoteEngineID: &eid, RemoteBlockIDs: append([]int{}, ids...), RemoteRequestID: &rid,
		RemoteHost: &host, RemotePort: &port, TPSize: n.tp}
}

func (n *nixl) releaseLocked(requestID string) (blocks int, ok bool) {
	h, ok := n.holds[requestID]
	if !ok {
		return 0, false
	}
	delete(n.holds, requestID)
	h.eng.releaseHold(h.ids)
	return len(h.ids), true
}

// pullMsg is D's message on P's side channel (a pull, then its
// completion notification), and P's answer.
type pullMsg struct {
	EngineID  string `json:"engine_id"` // the engine D expects
	RequestID string `json:"request_id"`
	BlockIDs  []int  `json:"block_ids"`
	// Done: D read the blocks (or, with Abort, gave up on them): P may
	// free them.
	Done   bool   `json:"done,omitempty"`
	Abort  bool   `json:"abort,omitempty"`
	OK     bool   `json:"ok"`
	Blocks int    `json:"blocks"`
	Error  string `json:"error,omitempty"`
}

// answer serves one side-channel connection: a pull is checked against
// P's holds and answered; the blocks stay held while D reads them and are
// freed by D's notification (read, or aborted), as NIXL's notification
// frees them on P. A channel that breaks before the notification leaves
// them to the lease.
func (n *nixl) answer(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	dec := json.NewDecoder(bufio.NewReader(c))
	enc := json.NewEncoder(c)
	var m pullMsg
	if err := dec.Decode(&m); err != nil {
		return
	}
	out := pullMsg{RequestID: m.RequestID}
	n.mu.Lock()
	h, held := n.holds[m.RequestID]
	switch {
	case m.EngineID != n.engineID:
		out.Error = fmt.Sprintf("remote engine id %s is not this engine (%s): it restarted", m.EngineID, n.engineID)
	case !held:
		out.Error = "no KV blocks held for request " + m.RequestID + " (lease expired or already pulled)"
	case m.Abort:
		h.timer.Stop()
		out.Blocks, out.OK = n.releaseLocked(m.RequestID) // D gave up before reading
	case len(m.BlockIDs) != len(h.ids):
		out.Error = fmt.Sprintf("block ids do not match: %d asked, %d held", len(m.BlockIDs), len(h.ids))
	default:
		out.Blocks, out.OK = len(h.ids), true
	}
	n.mu.Unlock()
	if enc.Encode(out) != nil || !out.OK || m.Abort {
		return
	}
	var done pullMsg
	if dec.Decode(&done) != nil || !done.Done {
		return // D went away mid-read: the lease frees the blocks
	}
	n.mu.Lock()
	if h, ok := n.holds[m.RequestID]; ok {
		h.timer.Stop()
		n.releaseLocked(m.RequestID)
	}
	n.mu.Unlock()
	_ = enc.Encode(pullMsg{RequestID: m.RequestID, OK: true})
}

// pull fetches a request's KV from P, in virtual time: the handshake with
// a P engine not met before, then the prompt's KV bytes over the link,
// then the notification that frees P's blocks. It returns the modelled
// time the transfer took. A failed pull is counted
// (vllm:nixl_num_failed_transfers); a request cancelled meanwhile tells P
// to free the blocks.
func (n *nixl) pull(ctx context.Context, p *kvTransferParams, promptTokens int) (time.Duration, error) {
	d, err := n.pullOnce(ctx, p, promptTokens)
	if err != nil && ctx.Err() == nil {
		n.m.failed.Inc()
	}
	return d, err
}

func (n *nixl) pullOnce(ctx context.Context, p *kvTransferParams, promptTokens int) (time.Duration, error) {
	if p.RemoteHost == nil || p.RemotePort == nil || p.RemoteEngineID == nil || p.RemoteRequestID == nil {
		return 0, fmt.Errorf("kv_transfer_params lack remote_host, remote_port, remote_engine_id or remote_request_id")
	}
	var dl net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := dl.DialContext(dctx, "tcp", net.JoinHostPort(*p.RemoteHost, strconv.Itoa(*p.RemotePort)))
	cancel()
	if err != nil {
		return 0, fmt.Errorf("NIXL handshake with %s:%d failed: %v", *p.RemoteHost, *p.RemotePort, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	enc, dec := json.NewEncoder(c), json.NewDecoder(bufio.NewReader(c))
	msg := pullMsg{EngineID: *p.RemoteEngineID, RequestID: *p.RemoteRequestID, BlockIDs: p.RemoteBlockIDs}
	// abort tells P to free the blocks of a request that went away.
	abort := func() {
		a, err := net.DialTimeout("tcp", net.JoinHostPort(*p.RemoteHost, strconv.Itoa(*p.RemotePort)), time.Second)
		if err != nil {
			return
		}
		defer a.Close()
		_ = a.SetDeadline(time.Now().Add(time.Second))
		m := msg
		m.Abort = true
		if json.NewEncoder(a).Encode(m) == nil {
			var out pullMsg
			_ = json.NewDecoder(a).Decode(&out)
		}
	}
	n.mu.Lock()
	first := !n.paired[*p.RemoteEngineID]
	n.mu.Unlock()
	if first {
		// The lazy handshake: metadata exchange, agent registration.
		if !sleepCtx(ctx, n.clock.Real(n.handshake)) {
			abort()
			return n.handshake, ctx.Err()
		}
		n.mu.Lock()
		n.paired[*p.RemoteEngineID] = true
		n.mu.Unlock()
	}
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	if err := enc.Encode(msg); err != nil {
		return 0, fmt.Errorf("NIXL transfer: asking the prefill engine for the blocks: %v", err)
	}
	var out pullMsg
	if err := dec.Decode(&out); err != nil {
		return 0, fmt.Errorf("NIXL transfer: the prefill engine closed the channel: %v", err)
	}
	if !out.OK {
		return 0, fmt.Errorf("NIXL transfer failed: %s", out.Error)
	}
	xfer := kvTransferTime(promptTokens, n.bytesTok, n.gbps)
	if !sleepCtx(ctx, n.clock.Real(xfer)) {
		abort()
		return xfer, ctx.Err()
	}
	if err := enc.Encode(pullMsg{RequestID: msg.RequestID, Done: true}); err != nil {
		return 0, fmt.Errorf("NIXL transfer: notifying the prefill engine: %v", err)
	}
	if err := dec.Decode(&out); err != nil || !out.OK {
		return 0, fmt.Errorf("NIXL transfer: the prefill engine went away during the transfer: %v", err)
	}
	n.m.xfer.Observe(xfer.Seconds())
	n.m.bytes.Observe(float64(int64(promptTokens) * n.bytesTok))
	d := xfer
	if first {
		d += n.handshake
	}
	return d, nil
}

// ucxRDMA says whether UCX's environment points it at RDMA: HCA ports
// (mlx5_0:1) in UCX_NET_DEVICES, and UCX_TLS not TCP alone.
func ucxRDMA() bool {
	dev, tls := os.Getenv("UCX_NET_DEVICES"), os.Getenv("UCX_TLS")
	return strings.Contains(dev, ":") && !strings.HasPrefix(tls, "tcp")
}

// kvTransferTime is how long tokens' KV takes over a link of gbps GB/s.
func kvTransferTime(tokens int, bytesPerToken int64, gbps float64) time.Duration {
	return time.Duration(float64(int64(tokens)*bytesPerToken) / (gbps * 1e9) * float64(time.Second))
}

// sleepCtx waits d unless ctx ends first (false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// inject puts a prompt's pulled blocks into eng's cache, held for r until
// the scheduler admits it (then they are prefix-cache hits).
func inject(eng *Engine, r *request) {
	eng.mu.Lock()
	defer eng.mu.Unlock()
	for _, h := range r.hashes {
		if id, ok := eng.kv.cached[h]; ok {
			eng.kv.acquire(id)
			r.held = append(r.held, id)
			continue
		}
		if eng.kv.available() == 0 {
			break
		}
		id := eng.kv.alloc()
		eng.kv.register(id, h)
		r.held = append(r.held, id)
	}
}

// EnableNIXL gives an in-process server (NewServer) a NixlConnector with
// its side channel on host:port and the load-failure policy given ("fail"
// or "recompute"): for tests and benchmarks of disaggregated serving.
func (s *Server) EnableNIXL(pr Preset, host string, port int, policy string) error {
	cfg, err := parseKVTransfer(`{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"` + policy + `"}`)
	if err != nil {
		return err
	}
	s.nixl, err = listenNIXL(cfg, host, port, 1, pr, s.eng.clock, s.eng.m)
	return err
}

// Close stops what the server runs beside its engine (the NIXL side
// channel, SGLang's bootstrap server).
func (s *Server) Close() {
	s.nixl.close()
	s.sgl.close()
}

// PrefixHits is the prompt tokens the engine found in its cache so far.
func (s *Server) PrefixHits() float64 { return counterValue(s.eng.m.prefixH) }

// Paired is how many prefill engines this (decode) engine has handshaken
// with.
func (s *Server) Paired() int {
	if s.nixl == nil {
		return 0
	}
	s.nixl.mu.Lock()
	defer s.nixl.mu.Unlock()
	return len(s.nixl.paired)
}
