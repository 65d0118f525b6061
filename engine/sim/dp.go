package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoalhq/shoal/spec"
)

// dpRanks are the DP ranks one simulated process runs: vLLM's internal
// load balancing (the head runs every rank's engine: the headless nodes'
// engine cores sit behind its API server, so the simulator keeps them in
// its process), a hybrid node's local ranks, or an external-LB process's
// one. With expert parallelism the ranks step in lockstep, as MoE DP
// engines do (vLLM runs dummy batches on idle ranks while any rank has
// work): each wave takes as long as its slowest rank's step.
type dpRanks struct {
	engines  []*Engine
	first    int // DP rank of engines[0]
	lockstep bool
	clock    Clock
	wake     chan struct{}
}

// newDPRanks builds n ranks numbered from first, each with its own KV pool
// and batch, their series labelled per rank on one registry (the first
// engine's metrics hold it).
func newDPRanks(c serveConfig, p Params, clock Clock, n, first int) *dpRanks {
	reg := prometheus.NewRegistry()
	g := &dpRanks{first: first, lockstep: p.EP != nil, clock: clock, wake: make(chan struct{}, 1)}
	for i := 0; i < n; i++ {
		m := newRankMetrics(reg, first+i, i == 0, c.served, p.NumGPUBlocks, p.BlockSize, p.MaxModelLen, p.MaxBatchTokens, c.v0Metrics, c.flavor)
		e := newEngine(p, clock, m)
		m.eng = e
		if g.lockstep {
			e.wake = g.wake // one scheduler loop hears every rank
		}
		g.engines = append(g.engines, e)
	}
	return g
}

// pick is the engine for a request: the rank the X-data-parallel-rank
// header names, else vLLM's DP load balancer's choice (fewest waiting × 4
// + running).
func (g *dpRanks) pick(header string) (*Engine, error) {
	if header != "" {
		r, err := strconv.Atoi(header)
		if err != nil || r < g.first || r >= g.first+len(g.engines) {
			return nil, fmt.Errorf("Requested DP rank %s is out of range [%d, %d)", header, g.first, g.first+len(g.engines))
		}
		return g.engines[r-g.first], nil
	}
	best, score := g.engines[0], math.MaxInt
	for _, e := range g.engines {
		run, wait := e.queueLens()
		if s := wait*4 + run; s < score {
			best, score = e, s
		}
	}
	return best, nil
}

// Run steps the ranks until ctx ends.
func (g *dpRanks) Run(ctx context.Context) {
	if !g.lockstep {
		var wg sync.WaitGroup
		for _, e := range g.engines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				e.Run(ctx)
			}()
		}
		wg.Wait()
		return
	}
	for {
		if !g.busy() {
			select {
			case <-ctx.Done():
				return
			case <-g.wake:
			}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		g.wave(g.clock.Sleep)
	}
}

// busy: some rank has a request.
func (g *dpRanks) busy() bool {
	for _, e := range g.engines {
		if r, w := e.queueLens(); r+w > 0 {
			return true
		}
	}
	return false
}

// wave runs one lockstep step of every rank; sleep waits out its time.
func (g *dpRanks) wave(sleep func(time.Duration)) time.Duration {
	sts := make([]*stepState, len(g.engines))
	var d time.Duration
	for i, e := range g.engines {
		if sts[i] = e.prepareStep(); sts[i] != nil {
			d = max(d, sts[i].d)
		}
	}
	sleep(d)
	for i, e := range g.engines {
		if sts[i] != nil {
			e.finishStep(sts[i], d)
		}
	}
	return d
}

// each applies f to every rank (faults, resets).
func (g *dpRanks) each(f func(*Engine)) {
	for _, e := range g.engines {
		f(e)
	}
}

// deadErr is the first rank's death: one engine core dying fails the API
// server in front of it.
func (g *dpRanks) deadErr() error {
	for _, e := range g.engines {
		if err := e.deadErr(); err != nil {
			return err
		}
	}
	return nil
}

// queueLens sums the ranks' queues.
func (g *dpRanks) queueLens() (running, waiting int) {
	for _, e := range g.engines {
		r, w := e.queueLens()
		running, waiting = running+r, waiting+w
	}
	return running, waiting
}

// wedge makes every rank's steps produce nothing: a peer rank died, and
// the collectives of the next MoE layer wait for it forever.
func (g *dpRanks) wedge() {
	g.each(func(e *Engine) {
		e.mu.Lock()
		e.stalled = true
		e.mu.Unlock()
	})
}

// The Server's view of its engines: one, or a process's DP ranks.

// engineFor is the engine a request runs on.
func (s *Server) engineFor(header string) (*Engine, error) {
	if s.dp == nil {
		return s.eng, nil
	}
	return s.dp.pick(header)
}

// deadErr: the server cannot serve (an engine died).
func (s *Server) deadErr() error {
	if s.dp == nil {
		return s.eng.deadErr()
	}
	return s.dp.deadErr()
}

// engines applies f to each engine.
func (s *Server) engines(f func(*Engine)) {
	if s.dp == nil {
		f(s.eng)
		return
	}
	s.dp.each(f)
}

// queueLens sums the engines' queues.
func (s *Server) queueLens() (running, waiting int) {
	if s.dp == nil {
		return s.eng.queueLens()
	}
	return s.dp.queueLens()
}

// parseDP reads vLLM's data- and expert-parallel flags and refuses the
// combinations vLLM refuses, in its words.
func parseDP(fs *flagSet, c serveConfig) (dpConfig, error) {
	d := dpConfig{rank: -1, addr: fs.str("--data-parallel-address", "127.0.0.1"), hybrid: fs.boolean("--data-parallel-hybrid-lb"),
		external: fs.boolean("--data-parallel-external-lb"), ep: fs.boolean("--enable-expert-parallel"), eplb: fs.boolean("--enable-eplb"),
		a2a: fs.str("--all2all-backend", "allgather_reducescatter")}
	var err error
	for _, x := range []struct {
		p    *int
		name string
		def  int
	}{{&d.size, "--data-parallel-size", 1}, {&d.local, "--data-parallel-size-local", 0}, {&d.start, "--data-parallel-start-rank", 0},
		{&d.rpcPort, "--data-parallel-rpc-port", 29550}, {&d.apiServers, "--api-server-count", 1}} {
		if *x.p, err = fs.integer(x.name, x.def); err != nil {
			return d, err
		}
	}
	if fs.has("--data-parallel-rank") {
		if d.rank, err = fs.integer("--data-parallel-rank", 0); err != nil {
			return d, err
		}
		d.external = true // vLLM: a rank given means external load balancing
	}
	if !slices.Contains(spec.VLLMAll2AllBackends, d.a2a) {
		return d, fmt.Errorf("vllm serve: error: argument --all2all-backend: invalid choice: '%s' (choose from %s)", d.a2a, quoteList(spec.VLLMAll2AllBackends))
	}
	if cfg := fs.str("--eplb-config", ""); cfg != "" {
		var e struct {
			Window    *int `json:"window_size"`
			Step      *int `json:"step_interval"`
			Redundant *int `json:"num_redundant_experts"`
		}
		dec := json.NewDecoder(strings.NewReader(cfg))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&e); err != nil {
			return d, fmt.Errorf("vllm serve: error: argument --eplb-config: %v", err)
		}
		if e.Redundant != nil {
			d.redundant = *e.Redundant
		}
	}
	switch {
	case d.size < 1:
		return d, fmt.Errorf("ValueError: data_parallel_size must be at least 1, got %d", d.size)
	case d.eplb && !d.ep:
		return d, fmt.Errorf("ValueError: enable_expert_parallel must be True to use EPLB.")
	case d.hybrid && c.headless:
		return d, fmt.Errorf("ValueError: data_parallel_hybrid_lb is not applicable in headless mode")
	case d.hybrid && d.local == 0:
		return d, fmt.Errorf("ValueError: data_parallel_size_local must be set to use data_parallel_hybrid_lb.")
	case d.hybrid && d.external:
		return d, fmt.Errorf("ValueError: data_parallel_hybrid_lb and data_parallel_external_lb cannot both be set")
	case d.external && d.rank < 0:
		return d, fmt.Errorf("ValueError: data_parallel_rank must be set to use data_parallel_external_lb.")
	case d.external && (d.rank >= d.size):
		return d, fmt.Errorf("ValueError: data_parallel_rank (%d) must be less than data_parallel_size (%d)", d.rank, d.size)
	case d.start > 0 && !c.headless && !d.hybrid:
		return d, fmt.Errorf("ValueError: data_parallel_start_rank is only applicable in headless or hybrid mode")
	case d.apiServers > 1 && c.headless:
		return d, fmt.Errorf("ValueError: --api-server-count cannot be used with --headless")
	}
	if d.external {
		d.local, d.start = 1, d.rank
	}
	if d.local == 0 {
		d.local = d.size
	}
	if d.size%d.local != 0 || d.start%d.local != 0 || d.start >= d.size {
		return d, fmt.Errorf("ValueError: data_parallel_size (%d), data_parallel_size_local (%d) and data_parallel_start_rank (%d) do not describe whole nodes",
			d.size, d.local, d.start)
	}
	return d, nil
}

// checkDPWorld refuses a DP process whose local ranks need more GPUs than
// the node has.
func checkDPWorld(c serveConfig, world, gpus int) error {
	if need := c.dp.local * world; need > gpus {
		return fmt.Errorf("ValueError: DP adjusted local world size %d (data_parallel_size_local %d × world size %d) exceeds the %d GPUs on this node",
			need, c.dp.local, world, gpus)
	}
	return nil
}

// dpRendezvous joins the DP group: the first process listens as the DP
// coordinator on the RPC port and waits for the others; the others connect.
// The returned channel names a peer (or the coordinator) that went away.
func dpRendezvous(ctx context.Context, c serveConfig, log io.Writer) (<-chan string, bool, error) {
	n, idx := c.dp.procs()
	if n <= 1 {
		return nil, true, nil
	}
	addr := net.JoinHostPort(c.dp.addr, strconv.Itoa(c.dp.rpcPort))
	if idx == 0 {
		logf(log, "DP coordinator on %s: waiting for %d more DP processes", addr, n-1)
		return rendezvousMaster(ctx, addr, n, c.argsSig, log, true)
	}
	logf(log, "DP process %d of %d: joining the DP coordinator at %s", idx, n, addr)
	conn, err := rendezvousJoin(ctx, addr, idx, c.argsSig)
	if err != nil {
		return nil, false, err
	}
	lost := make(chan string, 1)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	go func() {
		defer stop()
		defer conn.Close()
		_, _ = io.Copy(io.Discard, conn)
		lost <- "the DP coordinator at " + addr
	}()
	return lost, true, nil
}

// localRanks is how many DP engines this process runs and the first one's
// rank: every rank on an internal-LB head, a hybrid node's own, an
// external process's one; SGLang's DP attention keeps them all on rank 0.
func (c serveConfig) localRanks() (n, first int) {
	switch {
	case c.flavor == "sglang":
		return max(1, c.sgDP), 0
	case !c.dp.on():
		return 1, 0
	case c.dp.external:
		return 1, c.dp.rank
	case c.dp.hybrid:
		return c.dp.local, c.dp.start
	default:
		return c.dp.size, 0
	}
}

// epOn: vLLM's --enable-expert-parallel or SGLang's --ep-size > 1 (the
// EPLB fields of dp are both engines').
func (c serveConfig) epOn() bool { return c.dp.ep || c.sgEP > 1 }

// epRanks is how many ranks the experts are spread over: vLLM's TP × DP,
// SGLang's --ep-size.
func (c serveConfig) epRanks() int {
	if c.flavor == "sglang" {
		return c.sgEP
	}
	return max(1, c.dp.size) * c.tp
}

// epNodes is how many nodes the experts span.
func (c serveConfig) epNodes(gpus int) int {
	switch {
	case c.flavor == "sglang":
		return max(1, c.nnodes)
	case c.dp.on() && !c.dp.external:
		return c.dp.size / c.dp.local
	default:
		return max(1, (c.dp.size*c.tp*c.pp+gpus-1)/gpus)
	}
}

// EPModel is a preset's expert-parallel costs (zero: a dense model, whose
// --enable-expert-parallel changes nothing).
type EPModel struct {
	A2ALatency  time.Duration // dispatch + combine per step
	A2APerToken time.Duration // per token whose experts are on another node
	// Imbalance multiplies a step's compute without EPLB: the wait for the
	// rank with the hottest experts.
	Imbalance float64
	// ExpertBytes is one expert's weights over all MoE layers, and
	// KVBytesPerToken the KV cache of one token: EPLB's redundant experts
	// take KV room.
	ExpertBytes     int64
	KVBytesPerToken int64
}

// withEP is p with the preset's EP costs over nodes: EPLB balances the
// experts (no imbalance) and its redundant experts, spread over the EP
// ranks, take their weights' worth of KV blocks.
func (pr Preset) withEP(p Params, nodes int, eplb bool, redundant, epRanks int) Params {
	m := pr.EP
	if m.A2ALatency == 0 && m.A2APerToken == 0 {
		return p
	}
	c := &EPCost{Nodes: nodes, A2ALatency: m.A2ALatency, A2APerToken: m.A2APerToken, Imbalance: m.Imbalance}
	if eplb {
		c.Imbalance = 1
		if redundant > 0 && epRanks > 0 && m.KVBytesPerToken > 0 {
			perRank := (int64(redundant) + int64(epRanks) - 1) / int64(epRanks)
			lost := int(perRank * m.ExpertBytes / (m.KVBytesPerToken * int64(p.BlockSize)))
			p.NumGPUBlocks = max(p.NumGPUBlocks/2, p.NumGPUBlocks-lost)
		}
	}
	p.EP = c
	return p
}
