package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/gossip"
	"gopkg.in/yaml.v3"
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
	seen := map[string]bool{} // served names seen from heads: known models
	var w *Watcher
	rebuild := func() {
		snap := w.Snapshot(nil)
		mu.Lock()
		for _, m := range snap.Ready() {
			seen[m] = true
		}
		models := make([]string, 0, len(seen))
		for m := range seen {
			models = append(models, m)
		}
		mu.Unlock()
		table.Set(w.Snapshot(models))
	}
	w = NewWatcher(cfg.Logger, rebuild)
	mem := gossip.New(gossip.Config{Cluster: cfg.Cluster, BindAddr: cfg.Address, BindPort: cfg.GossipPort, Join: cfg.Join,
		Profile: cfg.GossipProfile, Logger: cfg.Logger}, gossip.Tag{Kind: gossip.KindRouter, ID: cfg.NodeID, GRPC: ln.Addr().String(), Healthy: true})
	if err := mem.Start(); err != nil {
		ln.Close()
		return err
	}
	gctx, stopGossip := context.WithCancel(context.WithoutCancel(ctx))
	gdone := make(chan struct{})
	go func() { _ = mem.Run(gctx); close(gdone) }()
	srv := &http.Server{Handler: New(table, cfg.Logger, cfg.Router).Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	cfg.Logger.Info("router running", "listen", ln.Addr().String(), "gossip", mem.Addr())
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for ctx.Err() == nil {
		w.Sync(WantedFromGossip(mem.Members()))
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

// LoadAPIKeys reads a YAML file mapping each key to the models it may use:
//
//	sk-team-a: ["deepseek-r1-671b"]
//	sk-admin: ["*"]
func LoadAPIKeys(path string) (map[string][]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("api keys: %w", err)
	}
	var keys map[string][]string
	if err := yaml.Unmarshal(b, &keys); err != nil {
		return nil, fmt.Errorf("api keys file %s: want `KEY: [model, …]` lines: %w", path, err)
	}
	for k, ms := range keys {
		if len(k) < 8 {
			return nil, fmt.Errorf("api keys file %s: key %q is shorter than 8 characters", path, k)
		}
		if len(ms) == 0 {
			return nil, fmt.Errorf("api keys file %s: key %s…: list the models it may use, or [\"*\"]", path, k[:4])
		}
	}
	return keys, nil
}

// RunStatic serves a fixed set of backends given as MODEL=HOST:PORT: a router
// in front of engines shoal did not start (or for benchmarks).
func RunStatic(ctx context.Context, listen string, backends []string, cfg Config, log *slog.Logger) error {
	var eps []*Endpoint
	for i, b := range backends {
		model, addr, ok := strings.Cut(b, "=")
		if _, _, err := net.SplitHostPort(addr); !ok || model == "" || err != nil {
			return fmt.Errorf("--backend %q: want MODEL=HOST:PORT", b)
		}
		eps = append(eps, &Endpoint{Model: model, Addr: addr, Group: fmt.Sprintf("static-%d", i)})
	}
	table := NewTable()
	table.Set(NewSnapshot(nil, eps))
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("router listen: %w", err)
	}
	srv := &http.Server{Handler: New(table, log, cfg).Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	log.Info("router running", "listen", ln.Addr().String(), "backends", len(eps))
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}
