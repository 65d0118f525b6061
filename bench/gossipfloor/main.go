// Command gossipfloor joins a shoal gossip cluster as a member that does
// nothing else: memberlist's own idle cost (probes, gossip, push/pull), the
// floor against which bench's idle-cost test sets the agents' cost.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/shoalhq/shoal/gossip"
)

func main() {
	addr := flag.String("address", "127.0.0.1", "IP to gossip on")
	port := flag.Int("port", 7946, "gossip port")
	join := flag.String("join", "", "gossip address of a member")
	cluster := flag.String("cluster", "shoal", "cluster name")
	profile := flag.String("profile", "lan", "gossip profile")
	keyFile := flag.String("key-file", "", "gossip key file")
	flag.Parse()
	var keys [][]byte
	if *keyFile != "" {
		var err error
		if keys, err = gossip.LoadKeyFile(*keyFile); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m := gossip.New(gossip.Config{Cluster: *cluster, BindAddr: *addr, BindPort: *port, Join: []string{*join}, Profile: *profile,
		Logger: log, Keys: keys}, gossip.Tag{Kind: gossip.KindRouter, ID: "gossip-floor", GRPC: fmt.Sprintf("%s:%d", *addr, *port), Healthy: true})
	if err := m.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	_ = m.Run(ctx)
}
