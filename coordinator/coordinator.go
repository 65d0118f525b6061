package coordinator

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoalhq/shoal/coordinator/plan"
	"github.com/shoalhq/shoal/coordinator/replicate"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/security"
	"github.com/shoalhq/shoal/spec"
	"google.golang.org/grpc"
)

// Config is the coordinator's configuration.
type Config struct {
	NodeID        string
	Cluster       string
	Address       string // gossip bind IP
	GossipPort    int
	Join          []string
	GossipProfile string
	APIAddr       string // gRPC API for the CLI
	// MetricsAddr serves shoal's /metrics and Prometheus service discovery
	// (/v1/sd/engines, /v1/sd/agents); "" disables.
	MetricsAddr string
	RouterAddr  string // OpenAI HTTP ("" disables the built-in router)
	Router      router.Config
	DataDir     string
	// ReconcileInterval bounds how long a change waits when no event arrives.
	ReconcileInterval time.Duration
	// AutoscaleInterval is how often autoscaled deployments are decided.
	AutoscaleInterval time.Duration
	Logger            *slog.Logger
	// Ready is called once the API serves and the gossip is up.
	Ready func()
	// TLS secures the API (cli certificates or tokens) and the calls to
	// agents and heads; nil is cleartext (--insecure).
	TLS *security.TLS
	// GossipKeys encrypt gossip; GossipKeyFile keeps keyring changes.
	GossipKeys    [][]byte
	GossipKeyFile string
	// RaftAddr, when set, makes this coordinator a server of a replicated
	// group (docs/design/ha.md): host:port for Raft. Servers is the initial
	// set (node-id=host:port each, this one included); RaftProfile the
	// timeouts (lan, the default, or wan).
	RaftAddr    string
	Servers     []replicate.Server
	RaftProfile string
	// Slurm, when set, serves Slurm-sourced deployments (slurm.go).
	Slurm *SlurmConfig
	// Console, when set, serves the web console (consolesrv.go).
	Console *ConsoleConfig
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.NodeID == "" {
		c.NodeID = "coordinator"
	}
	if c.Cluster == "" {
		c.Cluster = "shoal"
	}
	if c.Address == "" {
		c.Address = "127.0.0.1"
	}
	if c.GossipPort == 0 {
		c.GossipPort = 7946
	}
	if c.APIAddr == "" {
		c.APIAddr = "127.0.0.1:7950"
	}
	if c.DataDir == "" {
		c.DataDir = "/var/lib/shoal-coordinator"
	}
	if c.ReconcileInterval == 0 {
		c.ReconcileInterval = time.Second
	}
	if c.AutoscaleInterval == 0 {
		c.AutoscaleInterval = 2 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if s := c.Slurm; s != nil {
		if s.Interval == 0 {
			s.Interval = 3 * time.Second
		}
		if s.Timeout == 0 {
			s.Timeout = 30 * time.Second
		}
	}
}

// membership is the gossip as the coordinator uses it (gossip.Membership;
// a fake in tests).
type membership interface {
	Start() error
	Run(ctx context.Context) error
	Members() map[string]gossip.Tag
	Changes() <-chan struct{}
	Joined() <-chan struct{}
	Addr() string
	PeerAddrs() []string
	KeyringOp(op, key string) error
	Join(addrs []string) (int, error)
}

// records is the store as the coordinator uses it (store.Store; a wrapper
// that fails on demand in tests).
type records interface {
	PutDeployment(d *spec.Deployment, yaml string) (bool, error)
	Deployment(name string) (*store.DeploymentRecord, error)
	Deployments() ([]*store.DeploymentRecord, error)
	DeleteDeployment(name string) error
	PutGroup(g *store.Group) error
	PutGroups(gs []*store.Group) error
	DeleteGroup(id string) error
	Groups() ([]*store.Group, error)
	AdoptSpec(deployment, spec string) error
}

// Coordinator is the control plane.
type Coordinator struct {
	cfg   Config
	log   *slog.Logger
	store records
	// repl is the Raft server of a replicated coordinator; nil for a single one.
	repl  *replicate.Node
	snap  snapshotter
	lconn leaderConns
	mem   membership
	// now is the clock of every decision (reconcile, the guard, the
	// autoscaler, demand); tests inject theirs.
	now    func() time.Time
	events *events
	table  *router.Table
	heads  *router.Watcher
	calls  *caller
	wake   chan struct{}

	// Owned by the reconcile loop.
	seen         map[string]time.Time // agent → last seen in gossip
	seenInJob    map[string]bool      // agent → it ran in a Slurm job when last seen
	guard        plan.Guard
	failureAsked map[string]time.Time // agent → last asked why its engine failed

	mu        sync.Mutex
	models    []string                // guarded by mu; served model names of all deployments
	scalers   map[string]*scalerState // guarded by mu; per autoscaled deployment
	demand    map[string]time.Time    // guarded by mu; served model → last request held for it
	short     map[string]string       // guarded by mu; deployment → why a replica cannot be placed
	guardView plan.Guard              // guarded by mu; the guard as the API shows it
	slurm     *slurmView              // guarded by mu; the Slurm node source's last decision
	adapters  *adapterBook            // the adapter loop's memory (adapters.go)

	started time.Time // Run's start: see settling
	// roles: which deployments that run are roles of a stored one
	// (roles.go), as of the last read.
	roles map[string]roleInfo // guarded by mu
	// warmer holds new prefill/decode endpoints out of the built-in
	// router's table until their pairs are warmed (nil: no router).
	warmer atomic.Pointer[router.Warmer]

	reg        *prometheus.Registry
	cm         *clusterMetrics
	asDesired  *prometheus.GaugeVec
	asCurrent  *prometheus.GaugeVec
	asValue    *prometheus.GaugeVec
	asPanic    *prometheus.GaugeVec
	asRescales *prometheus.CounterVec
	passes     prometheus.Histogram
}

// New builds a coordinator. It starts nothing.
func New(cfg Config) *Coordinator {
	cfg.Defaults()
	c := &Coordinator{cfg: cfg, log: cfg.Logger.With("component", "coordinator"), events: newEvents(),
		table: router.NewTable(), wake: make(chan struct{}, 1), seen: map[string]time.Time{}, seenInJob: map[string]bool{}, failureAsked: map[string]time.Time{},
		scalers: map[string]*scalerState{}, demand: map[string]time.Time{}, short: map[string]string{}}
	c.now = time.Now
	c.heads = router.NewWatcher(c.log, c.rebuildTable, cfg.TLS)
	c.reg = cfg.Router.Registry
	if c.reg == nil {
		c.reg = prometheus.NewRegistry()
	}
	g := func(name, help string) *prometheus.GaugeVec {
		v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, []string{"deployment"})
		c.reg.MustRegister(v)
		return v
	}
	c.cm = newClusterMetrics(c, c.reg)
	c.reg.MustRegister(newRaftMetrics(c))
	c.asDesired = g("shoal_autoscaler_desired_replicas", "Replicas the autoscaler wants.")
	c.asCurrent = g("shoal_autoscaler_current_replicas", "Replica groups that exist (not draining).")
	c.asValue = g("shoal_autoscaler_metric_value", "The scaling metric's per-replica value the last decision used.")
	c.asPanic = g("shoal_autoscaler_panic_mode", "1 while the KPA autoscaler is in panic mode.")
	c.asRescales = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_autoscaler_rescales_total",
		Help: "Decisions that changed the replica count."}, []string{"deployment"})
	c.reg.MustRegister(c.asRescales)
	c.passes = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shoal_coordinator_reconcile_seconds",
		Help:    "How long one reconcile pass takes (read the store and the gossip, decide, write, hand the calls to agents off).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)})
	c.reg.MustRegister(c.passes)
	c.adapters = newAdapterBook(c.reg)
	return c
}

// Table is the router's endpoint table, kept current by the coordinator.
func (c *Coordinator) Table() *router.Table { return c.table }

func (c *Coordinator) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Run serves until ctx ends.
func (c *Coordinator) Run(ctx context.Context) error {
	if err := mkdir(c.cfg.DataDir); err != nil {
		return err
	}
	if cc := c.cfg.Console; cc != nil {
		if err := checkConsole(cc, c.cfg.TLS != nil); err != nil {
			return err
		}
	}
	if c.cfg.RaftAddr != "" {
		rc := replicate.Config{ID: c.cfg.NodeID, Addr: c.cfg.RaftAddr, Dir: filepath.Join(c.cfg.DataDir, "raft"),
			Servers: c.cfg.Servers, Profile: c.cfg.RaftProfile, Legacy: filepath.Join(c.cfg.DataDir, "coordinator.db"), Logger: c.cfg.Logger}
		if c.cfg.TLS != nil {
			var err error
			if rc.ServerTLS, rc.ClientTLS, err = c.cfg.TLS.PeerTLS(security.RoleCoordinator); err != nil {
				return err
			}
		}
		n, err := replicate.Open(rc)
		if err != nil {
			return err
		}
		defer n.Close()
		c.store, c.repl, c.snap = n, n, n
	} else {
		st, err := store.Open(c.cfg.DataDir + "/coordinator.db")
		if err != nil {
			return err
		}
		defer st.Close()
		if _, err := st.InitClusterID(randomClusterID()); err != nil {
			return err
		}
		c.store, c.snap = st, localSnapshots{st}
	}
	defer c.lconn.close()
	c.started = c.now()
	peers := &gossip.PeerFile{Path: filepath.Join(c.cfg.DataDir, "peers.json")}
	if c.mem == nil {
		c.mem = gossip.New(gossip.Config{Cluster: c.cfg.Cluster, BindAddr: c.cfg.Address, BindPort: c.cfg.GossipPort,
			Join: c.cfg.Join, Rejoin: peers.Load(), Profile: c.cfg.GossipProfile, Logger: c.cfg.Logger, Keys: c.cfg.GossipKeys, KeyFile: c.cfg.GossipKeyFile},
			gossip.Tag{Kind: gossip.KindCoordinator, ID: c.cfg.NodeID, GRPC: c.cfg.APIAddr, Healthy: true})
	}
	if err := c.mem.Start(); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", c.cfg.APIAddr)
	if err != nil {
		return fmt.Errorf("coordinator api: %w", err)
	}
	srv := grpc.NewServer(append(c.cfg.TLS.ServerOptions(security.CoordinatorPolicy, true), grpc.ChainUnaryInterceptor(c.forward))...)
	coordv1.RegisterCoordinatorServer(srv, &apiServer{c: c})
	var httpSrv *router.Server
	var chat http.Handler // the playground's way to the router
	if c.cfg.RouterAddr != "" {
		rl, err := net.Listen("tcp", c.cfg.RouterAddr)
		if err != nil {
			lis.Close()
			return fmt.Errorf("router: %w", err)
		}
		rc := c.cfg.Router
		rc.OnDemand = c.Demand
		rc.Registry = c.reg // one /metrics for the router and the autoscaler
		rc.KV = c.heads.KV()
		rc.Queues = c.heads.Queues()
		rc.Adapters = c.heads
		rt := router.New(c.table, c.cfg.Logger, rc)
		defer rt.Close()
		warm := rt.NewWarmer(c.rebuildTable)
		c.warmer.Store(warm)
		defer warm.Close()
		httpSrv = rt.NewServer(rl)
		go func() { _ = httpSrv.Serve() }()
		chat = rt.Handler()
	}
	var metricsSrv *http.Server
	if c.cfg.MetricsAddr != "" {
		ml, err := net.Listen("tcp", c.cfg.MetricsAddr)
		if err != nil {
			lis.Close()
			return fmt.Errorf("metrics: %w", err)
		}
		metricsSrv = &http.Server{Handler: c.metricsHandler(), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = metricsSrv.Serve(ml) }()
		defer metricsSrv.Close()
	}
	if c.cfg.Console != nil {
		stopConsole, err := c.startConsole(ctx, chat)
		if err != nil {
			lis.Close()
			return err
		}
		defer stopConsole()
	}
	var wg sync.WaitGroup
	gctx, stopGossip := context.WithCancel(context.WithoutCancel(ctx))
	c.calls = newCaller(ctx, c.cfg.TLS, c.log, c.poke)
	wg.Add(4)
	go func() { defer wg.Done(); c.autoscaleLoop(ctx) }()
	go func() { defer wg.Done(); _ = c.mem.Run(gctx) }()
	go func() { defer wg.Done(); _ = srv.Serve(lis) }()
	go func() { defer wg.Done(); peers.Keep(ctx, c.mem, c.log) }()
	wg.Add(2)
	go func() { defer wg.Done(); c.rejoin(ctx, peers) }()
	go func() { defer wg.Done(); c.adapterLoop(ctx) }()
	if c.cfg.Slurm != nil {
		wg.Add(1)
		go func() { defer wg.Done(); c.slurmLoop(ctx) }()
	}
	c.log.Info("coordinator running", "api", c.cfg.APIAddr, "router", c.cfg.RouterAddr, "gossip", c.mem.Addr(), "raft", c.cfg.RaftAddr)
	if c.cfg.Ready != nil {
		go func() {
			select {
			case <-c.mem.Joined():
				c.cfg.Ready()
			case <-ctx.Done():
			}
		}()
	}

	// The loop wakes on events; the interval bounds how stale a decision
	// that waits on time (a drain, a long absence) can be.
	t := time.NewTicker(c.cfg.ReconcileInterval)
	defer t.Stop()
	guardWake := time.NewTimer(time.Hour)
	defer guardWake.Stop()
	for ctx.Err() == nil {
		t0 := time.Now()
		wake, err := c.reconcile(ctx)
		c.passes.Observe(time.Since(t0).Seconds())
		if err != nil {
			c.log.Error("reconcile", "err", err)
		}
		guardWake.Stop()
		if !wake.IsZero() {
			guardWake.Reset(max(time.Until(wake), time.Millisecond))
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		case <-c.wake:
		case <-c.mem.Changes():
		case <-c.leaderChanges():
		case <-guardWake.C:
		}
		// Passes are at least minPassGap apart: a burst of events (a
		// thousand agents' tags, a hundred calls answering) is one pass.
		if d := minPassGap - time.Since(t0); d > 0 && ctx.Err() == nil {
			gap := time.NewTimer(d)
			select {
			case <-ctx.Done():
			case <-gap.C:
			}
			gap.Stop()
		}
	}
	c.calls.wait()
	c.heads.StopAll()
	if httpSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = httpSrv.Shutdown(sctx)
		cancel()
	}
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		srv.Stop()
	}
	stopGossip()
	wg.Wait()
	return nil
}

// minPassGap spaces reconcile passes: what they react to (gossip, calls)
// comes in bursts, and a pass costs milliseconds at a thousand agents.
const minPassGap = 50 * time.Millisecond

// rejoinEvery is how often a coordinator that holds for isolation contacts
// the peers it remembers.
const rejoinEvery = 3 * time.Second

// rejoin, while the isolation guard holds, contacts the gossip peers the
// coordinator remembers: once the network heals it has its cluster back
// within seconds instead of waiting for others to gossip to it.
func (c *Coordinator) rejoin(ctx context.Context, peers *gossip.PeerFile) {
	t := time.NewTicker(rejoinEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.mu.Lock()
		holding := c.guardView.Holding
		c.mu.Unlock()
		if !holding {
			continue
		}
		if n, err := c.mem.Join(peers.Load()); n > 0 {
			c.log.Info("isolation guard: rejoined remembered gossip peers", "contacted", n)
		} else {
			c.log.Debug("isolation guard: no remembered peer answers yet", "err", err)
		}
	}
}

// agents returns the live agents' tags.
func (c *Coordinator) agents() map[string]gossip.Tag {
	out := map[string]gossip.Tag{}
	for id, t := range c.mem.Members() {
		if t.Kind == gossip.KindAgent {
			out[id] = t
		}
	}
	return out
}

// rebuildTable publishes a new router snapshot from the heads' states
// (draining groups are left out by the watcher).
func (c *Coordinator) rebuildTable() {
	c.mu.Lock()
	models := c.models
	c.mu.Unlock()
	snap := c.heads.Snapshot(models)
	if w := c.warmer.Load(); w != nil {
		snap = w.Gate(snap) // new prefill/decode endpoints wait for their pairs' warm-ups
	}
	c.table.Set(snap)
}
