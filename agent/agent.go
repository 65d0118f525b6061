package agent

import (
	"context"
	"errors"
	"fmt"
	"github.com/shoalhq/shoal/internal/kvevents"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/shoalhq/shoal/agent/runner"
	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/gpu"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	"github.com/shoalhq/shoal/rdma"
	"github.com/shoalhq/shoal/security"
	"google.golang.org/grpc"
)

// membership is the gossip as the agent uses it (gossip.Membership; a fake
// in the supervisor's tests).
type membership interface {
	Start() error
	Run(ctx context.Context) error
	Member(id string) (gossip.Tag, bool)
	Local() gossip.Tag
	SetTag(t gossip.Tag) error
	Changes() <-chan struct{}
	Count() int
	Joined() <-chan struct{}
	SkipLeave()
	Addr() string
	PeerAddrs() []string
}

// Agent is the daemon on one GPU host.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	ins     gpu.Inspector
	scanner *rdma.Scanner
	mem     membership
	reg     *prometheus.Registry
	// wake is poked (coalesced) by runners and anything else that changed
	// what the supervisor decides on; cmds runs a function on the loop.
	wake chan struct{}
	cmds chan func()
	quit chan struct{} // closed when the loop has ended

	replica replicaPublisher
	store   *stateStore
	rts     runtimes
	// dial and prober reach other agents and a head's engine (seams: the
	// supervisor's tests replace them, as they replace mem and rts.open).
	dial   func(addr string) (runner.MemberClient, error)
	prober func(base, served, canary string, extra map[string]any) runner.Prober
	// kvSubscribe hears a head's engine's KV events (a seam: ZeroMQ sockets
	// outside the tests' fake clock).
	kvSubscribe func(ctx context.Context, k *engine.KVEvents, h kvevents.Handler) error
	// bg counts the goroutines the agent starts besides the loop (weights
	// checks), so that Run returns only after they ended.
	bg sync.WaitGroup

	// Owned by the loop goroutine (supervisor.go): no lock.
	loc        Local
	fence      uint64 // the newest coordinator term obeyed (see fenced)
	run        *activeRun
	ad         adapterState // the run's LoRA adapters (lora.go)
	hw         *HostInventory
	lastSeen   map[string]seenTag
	restarting bool
	// leaving says why the node will soon be gone (its Slurm job was
	// signalled); jobEnds is its job's end. Loop only.
	leaving string
	jobEnds time.Time
	weights bool // this host holds the assigned model (the election prefers it)
	// saved and shown: what was last handed to the state store and to the
	// Status snapshot, so that an unchanged state costs nothing.
	saved struct {
		key persisted
		gen uint64
	}
	shown statusKey

	// pulled is set by a run whose weight pull completed (read by the loop).
	pulled atomic.Bool
	// status is what Status answers and Assign validates against, rebuilt
	// by the loop after every decision: the API never waits for the loop.
	status atomic.Pointer[statusSnapshot]

	engineState *prometheus.GaugeVec
	dl          *downloadMetrics
	am          *agentMetrics
	adm         *adapterMetrics
}

type agentMetrics struct {
	members  prometheus.Gauge
	claims   prometheus.Counter
	starts   *prometheus.CounterVec
	failures prometheus.Counter
	deposed  prometheus.Counter
}

func newAgentMetrics(reg *prometheus.Registry) *agentMetrics {
	m := &agentMetrics{
		members: prometheus.NewGauge(prometheus.GaugeOpts{Name: "shoal_agent_gossip_members",
			Help: "Live members of the gossip this agent sees, itself included."}),
		claims: prometheus.NewCounter(prometheus.CounterOpts{Name: "shoal_agent_head_claims_total",
			Help: "Times this agent claimed the head of its group (elections won)."}),
		starts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_agent_engine_starts_total",
			Help: "Engine starts by role (head, worker)."}, []string{"role"}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{Name: "shoal_agent_engine_failures_total",
			Help: "Replica failures this agent saw (its engine, a member, a hang, a canary)."}),
		deposed: prometheus.NewCounter(prometheus.CounterOpts{Name: "shoal_agent_deposed_commands_total",
			Help: "Coordinator commands refused because they came from a deposed leader (an older Raft term)."}),
	}
	m.starts.WithLabelValues("head")
	m.starts.WithLabelValues("worker")
	reg.MustRegister(m.members, m.claims, m.starts, m.failures, m.deposed)
	return m
}

// New builds an agent from a validated config. It starts nothing.
func New(cfg Config, ins gpu.Inspector, sc *rdma.Scanner) (*Agent, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	reg := prometheus.NewRegistry()
	if sc == nil {
		sc = rdma.NewScanner()
	}
	a := &Agent{cfg: cfg, log: cfg.Logger.With("component", "agent", "node", cfg.NodeID), ins: ins, scanner: sc,
		reg: reg, lastSeen: map[string]seenTag{}, wake: make(chan struct{}, 1), cmds: make(chan func()), quit: make(chan struct{})}
	a.rts = runtimes{open: a.openRuntime, m: map[string]engine.Runtime{}}
	a.dial = a.dialMember
	a.prober = func(base, served, canary string, extra map[string]any) runner.Prober {
		return runner.HTTPProber{Base: base, Served: served, CanaryPath: canary, CanaryFields: extra}
	}
	a.kvSubscribe = func(ctx context.Context, k *engine.KVEvents, h kvevents.Handler) error {
		s := &kvevents.Subscriber{Endpoint: k.Endpoint, Replay: k.Replay, Topic: k.Topic}
		return s.Run(ctx, h)
	}
	a.replica = newReplicaServer(a.replicaAddr(), a.log, cfg.TLS)
	a.engineState = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_agent_engine_state",
		Help: "1 for the engine state this agent advertises."}, []string{"state"})
	reg.MustRegister(a.engineState, prometheus.NewGoCollector())
	a.dl = newDownloadMetrics(reg)
	a.am = newAgentMetrics(reg)
	a.adm = newAdapterMetrics(reg)
	return a, nil
}

func (a *Agent) grpcAddr() string {
	return net.JoinHostPort(a.cfg.Address, strconv.Itoa(a.cfg.GRPCPort))
}
func (a *Agent) replicaAddr() string {
	return net.JoinHostPort(a.cfg.Address, strconv.Itoa(a.cfg.ReplicaPort))
}

// poke wakes the loop; it never blocks.
func (a *Agent) poke() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// Run fingerprints, joins the cluster, serves the Agent API and supervises
// engines until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	adopted, err := a.prepare(ctx)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", a.grpcAddr())
	if err != nil {
		return fmt.Errorf("agent api: %w", err)
	}
	srv := grpc.NewServer(a.cfg.TLS.ServerOptions(security.AgentPolicy, false)...)
	agentv1.RegisterAgentServer(srv, &agentServer{a: a})
	if adopted != nil {
		// Before gossip starts, so the first tag already claims the term (or
		// follows the head) the engine runs in: peers see no change.
		a.resume(adopted)
	}
	a.publishStatus()

	peers := &gossip.PeerFile{Path: filepath.Join(a.cfg.StateDir, "peers.json")}
	if a.mem == nil {
		a.mem = gossip.New(gossip.Config{Cluster: a.cfg.Cluster, BindAddr: a.cfg.Address, BindPort: a.cfg.GossipPort,
			Join: a.cfg.Join, Rejoin: peers.Load(), Profile: a.cfg.GossipProfile, Logger: a.cfg.Logger, Keys: a.cfg.GossipKeys, KeyFile: a.cfg.GossipKeyFile}, a.tag())
	}
	if err := a.mem.Start(); err != nil {
		lis.Close()
		return err
	}
	var wg sync.WaitGroup
	gctx, stopGossip := context.WithCancel(context.WithoutCancel(ctx))
	sctx, stopStore := context.WithCancel(context.WithoutCancel(ctx))
	wg.Add(3)
	go func() { defer wg.Done(); _ = a.mem.Run(gctx) }()
	go func() { defer wg.Done(); _ = srv.Serve(lis) }()
	storeDone := make(chan struct{})
	go func() { defer wg.Done(); defer close(storeDone); a.store.Run(sctx) }()
	var metricsSrv *http.Server
	if a.cfg.MetricsAddr != "" {
		metricsSrv = &http.Server{Addr: a.cfg.MetricsAddr, Handler: promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := metricsSrv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				a.log.Error("metrics server", "err", err)
			}
		}()
	}
	a.log.Info("agent running", "grpc", a.grpcAddr(), "gossip", a.mem.Addr(), "cluster", a.cfg.Cluster)
	if a.cfg.Ready != nil {
		go func() {
			select {
			case <-a.mem.Joined(): // hardware was fingerprinted before the gossip started
				a.cfg.Ready()
			case <-ctx.Done():
			}
		}()
	}
	hctx, stopHealth := context.WithCancel(ctx)
	wg.Add(4)
	go func() { defer wg.Done(); a.watchGPUs(hctx) }()
	go func() { defer wg.Done(); a.reinspect(hctx) }()
	go func() { defer wg.Done(); a.rotateLogs(hctx) }()
	go func() { defer wg.Done(); peers.Keep(hctx, a.mem, a.log) }()
	if a.cfg.JobEnds != nil {
		wg.Add(1)
		go func() { defer wg.Done(); a.watchJob(hctx) }()
	}

	a.loop(ctx)
	stopHealth()
	a.exit()

	a.replica.stop()
	a.replica.wait()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(3 * time.Second):
		srv.Stop()
	}
	if metricsSrv != nil {
		_ = metricsSrv.Close()
	}
	a.bg.Wait()
	stopStore()
	<-storeDone
	stopGossip()
	wg.Wait()
	a.rts.closeAll()
	return nil
}

// prepare loads the state, adopts the engines a previous agent process left
// running (returning the run to resume, if any) and fingerprints the
// hardware: everything the loop needs before it starts.
func (a *Agent) prepare(ctx context.Context) (*activeRun, error) {
	st, err := LoadState(a.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if st.NodeID != "" && st.NodeID != a.cfg.NodeID {
		return nil, fmt.Errorf("state dir %s belongs to node %q, not %q; use that node id or another state_dir", a.cfg.StateDir, st.NodeID, a.cfg.NodeID)
	}
	st.NodeID = a.cfg.NodeID
	nofile, memlock := process.RaiseLimits()
	a.log.Debug("engine limits", "nofile", nofile, "memlock", memlock)
	// Engines a previous agent process left keep running: adopt them (or stop
	// those of a run that cannot resume whole, so that none holds GPUs).
	adopted := a.adopt(ctx, &st)
	if err := st.Save(a.cfg.StateDir); err != nil {
		return nil, err
	}
	a.store = newStateStore(a.cfg.StateDir, a.log, st)
	a.loc = Local{As: st.Assignment, LastTerm: st.LastTerm, Backoff: a.cfg.RestartBackoff, Draining: st.Draining}
	a.fence = st.CoordinatorTerm
	if st.Assignment != nil {
		a.weights = a.hasWeights(st.Assignment.Spec)
	}

	// Fingerprint first: the node joins with its real inventory.
	hw, err := InspectHost(ctx, a.ins, a.scanner, a.cfg.Address, a.cfg.EngineEnv)
	if err == nil {
		if err := hw.own(a.cfg.GPUs, a.cfg.GPUMinors, a.cfg.GPUUUIDs); err != nil {
			return nil, fmt.Errorf("agent config: %w", err)
		}
	}
	if err != nil {
		a.log.Error("hardware inspection failed; advertising 0 GPUs", "err", err)
		hw = &HostInventory{GPU: &gpu.Inventory{}, RDMASum: "none", NCCLEnv: rdma.NCCLEnv(nil, "", a.cfg.EngineEnv)}
	}
	a.hw = hw
	a.log.Info("hardware found", "gpus", len(hw.GPU.Devices), "model", hw.GPU.Model(), "driver", hw.GPU.DriverVersion,
		"healthy", hw.GPU.Healthy(), "rdma", hw.RDMASum, "interface", hw.Interface, "owned", hw.Visible)
	for _, c := range hw.Preflight {
		if !c.OK {
			a.log.Warn("preflight", "check", c.Name, "detail", c.Detail)
		}
	}

	return adopted, nil
}

// exit ends the run, if any, as the agent leaves: its engines stop (when
// configured) or keep serving for the next agent process, which adopts them.
func (a *Agent) exit() {
	a.closeAdapters()
	if a.run == nil {
		return
	}
	if a.cfg.StopEnginesOnExit {
		a.run.r.Stop("agent exiting", a.cfg.StopGrace)
		select {
		case <-a.run.r.Done():
		case <-time.After(a.cfg.StopGrace + 15*time.Second):
			a.log.Error("engines did not stop before the agent exited")
		}
		a.run = nil
		a.persist()
		return
	}
	// Say so (a head then waits up to restartGrace for this member), give
	// the word a moment to spread, and leave without a graceful leave,
	// which would tell the group this member is gone.
	a.run.r.Detach()
	<-a.run.r.Done()
	a.persist() // the records of every engine the run started
	a.restarting = true
	a.publish()
	time.Sleep(announceRestart)
	a.mem.SkipLeave()
	a.log.Info("agent exiting; engines keep running for the next agent process to adopt")
}

type seenTag struct {
	tag gossip.Tag
	at  time.Time
}

// announceRestart is how long an exiting agent lets its "restarting" tag
// spread; restartGrace is how long a head then waits for that member's agent
// to answer again (a systemd restart takes a second or two).
const (
	announceRestart = 400 * time.Millisecond
	restartGrace    = 30 * time.Second
)

// agentMetricsAddr turns a listen address (":9400") into one others dial.
func agentMetricsAddr(listen, ip string) string {
	if listen == "" {
		return ""
	}
	h, p, err := net.SplitHostPort(listen)
	if err != nil {
		return ""
	}
	if h == "" || h == "0.0.0.0" || h == "::" {
		h = ip
	}
	if _, err := strconv.Atoi(p); err != nil {
		return ""
	}
	return net.JoinHostPort(h, p)
}
