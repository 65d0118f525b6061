package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/gossip"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/security"
)

// StandaloneConfig runs a router without the coordinator: it joins the gossip,
// finds the heads there and watches them itself, so several routers can sit
// behind a load balancer and routing survives the coordinator being down.
type StandaloneConfig struct {
	NodeID        string
	Cluster       string
	Address       string // gossip bind IP
	GossipPort    int
	Join          []string
	GossipProfile string
	Listen        string // OpenAI HTTP address
	Router        Config
	Logger        *slog.Logger
	// Ready is called once the router listens and has joined the gossip.
	Ready func()
	// TLS (router role) for the heads' Replica API and the coordinator.
	TLS           *security.TLS
	GossipKeys    [][]byte
	GossipKeyFile string
}

// RunStandalone serves until ctx ends.
func RunStandalone(ctx context.Context, cfg StandaloneConfig) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if len(cfg.Join) == 0 {
		return errors.New("router: --join is required: the router learns the replicas from the cluster's gossip")
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("router listen: %w", err)
	}
	table := NewTable()
	var mu sync.Mutex
	seen := map[string]bool{} // guarded by mu; served names seen from heads
	var listed []string       // guarded by mu; the coordinator's deployments, once it answered
	var w *Watcher
	var warm *Warmer // set before the watcher's first change
	rebuild := func() {
		snap := w.Snapshot(nil)
		mu.Lock()
		for _, m := range snap.Ready() {
			seen[m] = true
		}
		// Known models: the coordinator's list when it has answered (so a
		// deleted deployment is unknown again), else every model seen.
		models := listed
		if models == nil {
			for m := range seen {
				models = append(models, m)
			}
		}
		mu.Unlock()
		s := w.Snapshot(models)
		if warm != nil {
			s = warm.Gate(s) // new prefill/decode endpoints wait for their pairs' warm-ups
		}
		table.Set(s)
	}
	learn := func(models []string) {
		mu.Lock()
		listed = append([]string{}, models...)
		mu.Unlock()
		rebuild()
	}
	w = NewWatcher(cfg.Logger, rebuild, cfg.TLS)
	mem := gossip.New(gossip.Config{Cluster: cfg.Cluster, BindAddr: cfg.Address, BindPort: cfg.GossipPort, Join: cfg.Join,
		Profile: cfg.GossipProfile, Logger: cfg.Logger, Keys: cfg.GossipKeys, KeyFile: cfg.GossipKeyFile}, gossip.Tag{Kind: gossip.KindRouter, ID: cfg.NodeID, GRPC: ln.Addr().String(), Healthy: true})
	if err := mem.Start(); err != nil {
		ln.Close()
		return err
	}
	gctx, stopGossip := context.WithCancel(context.WithoutCancel(ctx))
	gdone := make(chan struct{})
	go func() { _ = mem.Run(gctx); close(gdone) }()
	rc := cfg.Router
	rc.OnDemand = demandForwarder(mem, cfg.TLS, cfg.Logger)
	rc.KV = w.KV()
	rc.Queues = w.Queues()
	rc.Adapters = w
	rt := New(table, cfg.Logger, rc)
	defer rt.Close()
	warm = rt.NewWarmer(rebuild)
	defer warm.Close()
	srv := rt.NewServer(ln)
	go func() { _ = srv.Serve() }()
	cfg.Logger.Info("router running", "listen", ln.Addr().String(), "gossip", mem.Addr())
	if cfg.Ready != nil {
		go func() {
			select {
			case <-mem.Joined():
				cfg.Ready()
			case <-ctx.Done():
			}
		}()
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var lastList time.Time
	for ctx.Err() == nil {
		tags := mem.Members()
		w.Sync(WantedFromGossip(tags))
		if time.Since(lastList) > 3*time.Second {
			// Models with no replica yet (scale from zero) are known only to the
			// coordinator; its list is refreshed off the hot path and kept when it is down.
			lastList = time.Now()
			go func() {
				if models, err := listModels(ctx, cfg.TLS, tags); err == nil {
					learn(models)
				}
			}()
		}
		select {
		case <-ctx.Done():
		case <-mem.Changes():
		case <-t.C:
		}
	}
	w.StopAll()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	stopGossip()
	<-gdone
	return nil
}

// ParseBackends reads static backends: [prefill:|decode:]MODEL=HOST:PORT. A
// model with prefill backends is served disaggregated: each request is
// prefilled on one of them and decoded on one of its other backends.
func ParseBackends(backends []string) ([]*Endpoint, error) {
	var eps []*Endpoint
	for i, b := range backends {
		role, rest := "", b
		if r, after, ok := strings.Cut(b, ":"); ok && (r == RolePrefill || r == RoleDecode) {
			role, rest = r, after
		}
		model, addr, ok := strings.Cut(rest, "=")
		if _, _, err := net.SplitHostPort(addr); !ok || model == "" || err != nil {
			return nil, fmt.Errorf("--backend %q: want [prefill:|decode:]MODEL=HOST:PORT", b)
		}
		eps = append(eps, &Endpoint{Model: model, Addr: addr, Group: fmt.Sprintf("static-%d", i), Role: role, Rank: -1})
	}
	roles := map[string]map[string]int{}
	for _, e := range eps {
		if roles[e.Model] == nil {
			roles[e.Model] = map[string]int{}
		}
		roles[e.Model][e.Role]++
	}
	for m, r := range roles {
		if r[RolePrefill] > 0 && r[RoleDecode]+r[""] == 0 {
			return nil, fmt.Errorf("--backend: model %q has prefill backends but none to decode on: add decode:%s=HOST:PORT", m, m)
		}
		if r[RoleDecode] > 0 && r[RolePrefill] == 0 {
			return nil, fmt.Errorf("--backend: model %q has decode backends but none to prefill on: add prefill:%s=HOST:PORT", m, m)
		}
	}
	return eps, nil
}

// RunStatic serves a fixed set of backends (ParseBackends): a router in
// front of engines shoal did not start (or for benchmarks).
func RunStatic(ctx context.Context, listen string, backends []string, cfg Config, log *slog.Logger) error {
	eps, err := ParseBackends(backends)
	if err != nil {
		return err
	}
	table := NewTable()
	table.Set(NewSnapshot(nil, eps))
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("router listen: %w", err)
	}
	rt := New(table, log, cfg)
	if _, _, pd := splitRoles(eps); pd {
		// Warm every prefill/decode pair before the first request is taken.
		start := time.Now()
		n, errs := rt.WarmPairs(ctx, eps)
		for _, err := range errs {
			log.Warn("prefill/decode pair not warmed: its first request pays the connector's handshake", "err", err)
		}
		log.Info("prefill/decode pairs warmed", "pairs", n, "failed", len(errs), "took", time.Since(start).Round(time.Millisecond))
	}
	srv := rt.NewServer(ln)
	go func() { _ = srv.Serve() }()
	log.Info("router running", "listen", ln.Addr().String(), "backends", len(eps))
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// demandForwarder tells the coordinator (found in the gossip) that requests
// wait for a model with no ready replica, at most once a second per model and
// never on the request's path (the call runs in the background).
func demandForwarder(mem *gossip.Membership, tl *security.TLS, log *slog.Logger) func(string) {
	var mu sync.Mutex
	last := map[string]time.Time{}
	return func(model string) {
		mu.Lock()
		if time.Since(last[model]) < time.Second {
			mu.Unlock()
			return
		}
		last[model] = time.Now()
		mu.Unlock()
		tags := mem.Members()
		go func() {
			err := withCoordinator(context.Background(), tl, tags, func(ctx context.Context, c coordv1.CoordinatorClient) error {
				_, err := c.Demand(ctx, &coordv1.DemandRequest{Model: model})
				return err
			})
			if err != nil {
				log.Debug("demand not delivered", "model", model, "err", err)
			}
		}()
	}
}

// withCoordinator calls the coordinator found in the gossip, bounded to 2 s.
func withCoordinator(ctx context.Context, tl *security.TLS, tags map[string]gossip.Tag, f func(context.Context, coordv1.CoordinatorClient) error) error {
	var api string
	for _, t := range tags {
		if t.Kind == gossip.KindCoordinator {
			api = t.GRPC
		}
	}
	if api == "" {
		return errors.New("no coordinator in the gossip")
	}
	conn, err := tl.Dial(api)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return f(ctx, coordv1.NewCoordinatorClient(conn))
}

// listModels asks the coordinator for its deployments' served names.
func listModels(ctx context.Context, tl *security.TLS, tags map[string]gossip.Tag) ([]string, error) {
	var out []string
	err := withCoordinator(ctx, tl, tags, func(ctx context.Context, c coordv1.CoordinatorClient) error {
		resp, err := c.ListDeployments(ctx, &coordv1.ListDeploymentsRequest{})
		if err != nil {
			return err
		}
		for _, d := range resp.Deployments {
			out = append(out, d.Model)
		}
		return nil
	})
	return out, err
}
