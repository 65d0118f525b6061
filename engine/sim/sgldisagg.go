package sim

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// SGLang's prefill/decode disaggregation (--disaggregation-mode), as its
// router drives it (docs/design/pd.md §P2): the same request, with the
// prefill engine's bootstrap_host, bootstrap_port and a bootstrap_room,
// reaches a prefill engine (P) and a decode engine (D) at once. D registers
// the room at P's bootstrap server and waits; P computes the prompt, hands
// its KV to the room's D (the prompt's KV bytes over the link, in virtual
// time), frees it once D has it, and answers; D decodes from the
// transferred KV. P gone before D had the KV fails D's request; a room no
// D takes within SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT fails P's, one
// whose KV does not come within SGLANG_DISAGGREGATION_WAITING_TIMEOUT
// fails D's. D's first transfer from a P pays the transfer backend's
// connection set-up (nixl: the NIXL agents' lazy handshake, as for vLLM;
// mooncake: SHOAL_SIM_MOONCAKE_HANDSHAKE_SECONDS, 0 by default, since no
// figure for it is published) — what shoal's warm pairs pay instead of a
// user's request. While D waits for a room's KV it probes P's bootstrap
// server every SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL (5 s, at least 2);
// SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE (2, at least 1) failed probes
// in a row fail the request ("Losing connection with prefill instance"),
// so a P that hangs is caught within seconds, not at the waiting timeout.

// fakeBootstrapHost is SGLang's FAKE_BOOTSTRAP_HOST: a request with it
// runs without a peer (SGLang's server warm-up; shoal's readiness canary).
const fakeBootstrapHost = "2.2.2.2"

// sglDisaggConfig is the --disaggregation-* flags.
type sglDisaggConfig struct {
	mode, backend string
	bootstrapPort int
	ibDevice      string
}

// parseSGLDisagg reads the flags; nil when the server is not disaggregated.
func parseSGLDisagg(fs *flagSet) (*sglDisaggConfig, error) {
	c := &sglDisaggConfig{mode: fs.str("--disaggregation-mode", "null"), backend: fs.str("--disaggregation-transfer-backend", "mooncake"),
		ibDevice: fs.str("--disaggregation-ib-device", "")}
	var err error
	if c.bootstrapPort, err = fs.integer("--disaggregation-bootstrap-port", 8998); err != nil {
		return nil, err
	}
	switch c.mode {
	case "null":
		return nil, nil
	case "prefill", "decode":
	default:
		return nil, fmt.Errorf("launch_server.py: error: argument --disaggregation-mode: invalid choice: '%s' (choose from 'null', 'prefill', 'decode')", c.mode)
	}
	switch c.backend {
	case "mooncake", "nixl":
	case "ascend", "fake":
		return nil, fmt.Errorf("ValueError: the simulator models the mooncake and nixl transfer backends, got %q", c.backend)
	default:
		return nil, fmt.Errorf("launch_server.py: error: argument --disaggregation-transfer-backend: invalid choice: '%s' (choose from 'mooncake', 'nixl', 'ascend', 'fake')", c.backend)
	}
	return c, nil
}

// sglDisagg is one SGLang server's side of disaggregation.
type sglDisagg struct {
	cfg      *sglDisaggConfig
	clock    Clock
	bytesTok int64
	gbps     float64
	// bootstrapTimeout: how long P keeps a room's KV for a D that has not
	// come; waitTimeout: how long D waits for a room's KV.
	bootstrapTimeout, waitTimeout time.Duration
	// handshake is D's set-up with a P it has not read from before.
	handshake time.Duration
	// heartbeat and maxFailures: D's probes of P while it waits.
	heartbeat   time.Duration
	maxFailures int
	side        *sideChannel // P: the bootstrap server

	mu     sync.Mutex
	rooms  map[uint64]*room    // P: rooms by bootstrap_room
	done   map[uint64]struct{} // P: rooms handed over (a late D is told so)
	paired map[string]bool     // D: the bootstrap servers read from
}

// room is one request's meeting point on P.
type room struct {
	ready   chan struct{} // closed when P has the prompt's KV (or failed: err)
	handed  chan struct{} // closed when D has read it
	err     error
	eng     *Engine
	ids     []int
	blocks  int
	readyAt bool
}

func (d *sglDisagg) roomLocked(id uint64) *room {
	r, ok := d.rooms[id]
	if !ok {
		r = &room{ready: make(chan struct{}), handed: make(chan struct{})}
		d.rooms[id] = r
	}
	return r
}

// startSGLDisagg sets up the connector; P listens on host:bootstrapPort.
func startSGLDisagg(c *sglDisaggConfig, host string, pr Preset, clock Clock) (*sglDisagg, error) {
	d := &sglDisagg{cfg: c, clock: clock, bytesTok: pr.KVBytesPerToken, rooms: map[uint64]*room{}, done: map[uint64]struct{}{},
		paired:           map[string]bool{},
		bootstrapTimeout: time.Duration(envFloat("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300) * float64(time.Second)),
		waitTimeout:      time.Duration(envFloat("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300) * float64(time.Second)),
		heartbeat:        time.Duration(max(envFloat("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", 5), 2) * float64(time.Second)),
		maxFailures:      max(envInt("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", 2), 1)}
	if c.backend == "nixl" {
		d.handshake = time.Duration(envFloat("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", 5) * float64(time.Second))
	} else {
		d.handshake = time.Duration(envFloat("SHOAL_SIM_MOONCAKE_HANDSHAKE_SECONDS", 0) * float64(time.Second))
	}
	if d.bytesTok == 0 {
		d.bytesTok = 128 << 10
	}
	rdma := c.ibDevice != "" || (c.backend == "nixl" && ucxRDMA())
	d.gbps = envFloat("SHOAL_SIM_KV_GBPS", map[bool]float64{true: 50, false: 3}[rdma])
	if c.mode != "prefill" {
		return d, nil
	}
	side, err := listenSide(net.JoinHostPort(host, strconv.Itoa(c.bootstrapPort)))
	if err != nil {
		return nil, fmt.Errorf("OSError: [Errno 98] error while attempting to bind on address ('%s', %d) (disaggregation bootstrap server): %v", host, c.bootstrapPort, err)
	}
	d.side = side
	go side.serve(d.answer)
	return d, nil
}

func (d *sglDisagg) close() {
	if d == nil || d.side == nil {
		return
	}
	d.side.close()
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, r := range d.rooms {
		d.releaseLocked(id, r)
	}
}

func (d *sglDisagg) releaseLocked(id uint64, r *room) {
	delete(d.rooms, id)
	if r.eng == nil {
		return
	}
	r.eng.releaseHold(r.ids)
	r.eng = nil
}

// bootstrapMsg is D's registration (then its notification that it has the
// KV) and P's answers.
type bootstrapMsg struct {
	Room      uint64 `json:"room"`
	Heartbeat bool   `json:"heartbeat,omitempty"` // D's probe: P answers at once
	Done      bool   `json:"done,omitempty"`
	OK        bool   `json:"ok"`
	Blocks    int    `json:"blocks"`
	Error     string `json:"error,omitempty"`
}

// answer serves one connection to P's bootstrap server: a D registers a room and is answered when
// P has the room's KV; its notification frees the KV and ends P's request.
func (d *sglDisagg) answer(c net.Conn) {
	dec, enc := json.NewDecoder(bufio.NewReader(c)), json.NewEncoder(c)
	var m bootstrapMsg
	if dec.Decode(&m) != nil {
		return
	}
	if m.Heartbeat {
		_ = enc.Encode(bootstrapMsg{OK: true})
		return
	}
	d.mu.Lock()
	if _, gone := d.done[m.Room]; gone {
		d.mu.Unlock()
		_ = enc.Encode(bootstrapMsg{Room: m.Room, Error: fmt.Sprintf("bootstrap_room %d was already handed over or timed out", m.Room)})
		return
	}
	r := d.roomLocked(m.Room)
	d.mu.Unlock()
	t := time.NewTimer(d.clock.Real(d.bootstrapTimeout))
	defer t.Stop()
	select {
	case <-r.ready:
	case <-t.C:
		_ = enc.Encode(bootstrapMsg{Room: m.Room, Error: "the prefill engine did not prefill bootstrap_room " + strconv.FormatUint(m.Room, 10) + " in time"})
		return
	}
	if r.err != nil {
		_ = enc.Encode(bootstrapMsg{Room: m.Room, Error: r.err.Error()})
		return
	}
	if enc.Encode(bootstrapMsg{Room: m.Room, OK: true, Blocks: r.blocks}) != nil {
		return
	}
	_ = c.SetDeadline(time.Now().Add(time.Minute + d.clock.Real(d.waitTimeout)))
	var done bootstrapMsg
	if dec.Decode(&done) != nil || !done.Done {
		return // D went away: P's request times out and frees the KV
	}
	d.mu.Lock()
	if cur, ok := d.rooms[m.Room]; ok && cur == r {
		d.releaseLocked(m.Room, r)
		d.markDoneLocked(m.Room)
		close(r.handed)
	}
	d.mu.Unlock()
	_ = enc.Encode(bootstrapMsg{Room: m.Room, OK: true})
}

// handOver is P's end of a request: the prompt's KV (of er, finished on
// eng) is held for the room's D, and handOver returns when D has read it,
// or fails when no D came within the bootstrap timeout.
func (d *sglDisagg) handOver(ctx context.Context, id uint64, eng *Engine, er *request) error {
	ids := eng.holdPrompt(er.hashes)
	d.mu.Lock()
	r := d.roomLocked(id)
	r.eng, r.ids, r.blocks, r.readyAt = eng, ids, len(ids), true
	close(r.ready)
	d.mu.Unlock()
	t := time.NewTimer(d.clock.Real(d.bootstrapTimeout))
	defer t.Stop()
	select {
	case <-r.handed:
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if cur, ok := d.rooms[id]; ok && cur == r {
		d.releaseLocked(id, r)
		d.markDoneLocked(id)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("KVTransferError(bootstrap_room=%d): no decode engine took the KV within %v (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)", id, d.bootstrapTimeout)
}

// abandon fails a room P will not fill (its request ended first), so a D
// waiting on it learns at once.
func (d *sglDisagg) abandon(id uint64, why error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.roomLocked(id)
	if r.readyAt {
		return
	}
	r.err, r.readyAt = why, true
	close(r.ready)
	delete(d.rooms, id)
	d.markDoneLocked(id)
}

// markDoneLocked remembers a finished room so that a late D is told; the
// memory is bounded (a room is random: an old one is not met again).
func (d *sglDisagg) markDoneLocked(id uint64) {
	if len(d.done) >= 1<<16 {
		clear(d.done)
	}
	d.done[id] = struct{}{}
}

// receive is D's start of a request: register the room at P's bootstrap
// server, wait for the KV, read it (the backend's set-up with a P not read
// from before, then its bytes over the link, virtual time), tell P. It
// returns the modelled transfer time.
func (d *sglDisagg) receive(ctx context.Context, host string, port int, id uint64, promptTokens int) (time.Duration, error) {
	var dl net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := dl.DialContext(dctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	cancel()
	if err != nil {
		return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): could not reach the bootstrap server %s:%d: %v", id, host, port, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(d.clock.Real(d.waitTimeout)))
	dec, enc := json.NewDecoder(bufio.NewReader(c)), json.NewEncoder(c)
	if err := enc.Encode(bootstrapMsg{Room: id}); err != nil {
		return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): %v", id, err)
	}
	peer := net.JoinHostPort(host, strconv.Itoa(port))
	lost := make(chan struct{})
	waiting := make(chan struct{})
	go d.watchPeer(peer, c, waiting, lost)
	var m bootstrapMsg
	err = dec.Decode(&m)
	close(waiting)
	if err != nil {
		select {
		case <-lost:
			return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): Losing connection with prefill instance (bootstrap_addr: %s): %d heartbeats failed in a row", id, peer, d.maxFailures)
		default:
		}
		return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): the prefill engine went away before sending the KV: %v", id, err)
	}
	_ = c.SetDeadline(time.Now().Add(d.clock.Real(d.waitTimeout))) // a probe's failure may have cut it short
	if !m.OK {
		return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): %s", id, m.Error)
	}
	xfer := kvTransferTime(promptTokens, d.bytesTok, d.gbps)
	d.mu.Lock()
	if !d.paired[peer] {
		xfer += d.handshake
	}
	d.mu.Unlock()
	if !sleepCtx(ctx, d.clock.Real(xfer)) {
		return xfer, ctx.Err()
	}
	d.mu.Lock()
	d.paired[peer] = true
	d.mu.Unlock()
	if err := enc.Encode(bootstrapMsg{Room: id, Done: true}); err != nil {
		return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): %v", id, err)
	}
	if err := dec.Decode(&m); err != nil || !m.OK {
		return 0, fmt.Errorf("KVTransferError(bootstrap_room=%d): the prefill engine went away during the transfer: %v", id, err)
	}
	return xfer, nil
}

// watchPeer is D's heartbeat while it waits on P (peer) for a room's KV
// over c: a probe every heartbeat interval, each given the interval to be
// answered; maxFailures failures in a row close lost and end the wait.
// It returns when waiting closes.
func (d *sglDisagg) watchPeer(peer string, c net.Conn, waiting <-chan struct{}, lost chan<- struct{}) {
	t := time.NewTicker(d.clock.Real(d.heartbeat))
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-waiting:
			return
		case <-t.C:
		}
		if d.probe(peer) {
			failures = 0
			continue
		}
		if failures++; failures >= d.maxFailures {
			close(lost)
			_ = c.SetDeadline(time.Now()) // ends the wait
			return
		}
	}
}

// probe asks P's bootstrap server whether it is alive.
func (d *sglDisagg) probe(peer string) bool {
	limit := d.clock.Real(d.heartbeat)
	c, err := net.DialTimeout("tcp", peer, limit)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(limit))
	if json.NewEncoder(c).Encode(bootstrapMsg{Heartbeat: true}) != nil {
		return false
	}
	var m bootstrapMsg
	return json.NewDecoder(c).Decode(&m) == nil && m.OK
}

// EnableSGLangDisagg makes an in-process server (NewServer) one side of
// SGLang's disaggregation (mode prefill or decode; a prefill server's
// bootstrap server listens on host:port): for tests and benchmarks.
func (s *Server) EnableSGLangDisagg(pr Preset, mode, host string, port int) error {
	var err error
	s.sgl, err = startSGLDisagg(&sglDisaggConfig{mode: mode, backend: "mooncake", bootstrapPort: port}, host, pr, s.eng.clock)
	return err
}
