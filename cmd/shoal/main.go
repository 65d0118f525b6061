// Command shoal runs multi-node LLM inference on bare-metal GPU hosts: the
// agent (every GPU host), the coordinator (control plane and router), the CLI
// verbs against it, and `shoal dev`, a whole cluster on one machine.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	_ "net/http/pprof" // served only when SHOAL_PPROF_ADDR is set
	"os"
	"os/signal"
	"syscall"

	"github.com/shoalhq/shoal/engine/containerd"
	"github.com/urfave/cli/v2"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

func main() {
	if len(os.Args) == 3 && os.Args[1] == containerd.LoggerFlag {
		// containerd's shim runs this binary as an engine container's log writer.
		os.Exit(containerd.RunLogger(os.Args[2]))
	}
	// Opt-in profiling for operators chasing a hot spot: SHOAL_PPROF_ADDR=127.0.0.1:6060.
	if addr := os.Getenv("SHOAL_PPROF_ADDR"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
	app := newApp()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app.RunContext(ctx, reorder(app, os.Args)); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

// newApp is the whole command line: every command and flag, as main runs
// it and as the tests and the reference doc read it.
func newApp() *cli.App {
	return &cli.App{
		Name:    "shoal",
		Usage:   "multi-node LLM inference on bare-metal GPU hosts",
		Version: version,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", EnvVars: []string{"SHOAL_LOG_LEVEL"}, Usage: "debug, info, warn or error"},
		},
		Commands: []*cli.Command{agentCommand(), coordinatorCommand(), routerCommand(), applyCommand(), getCommand(), describeCommand(),
			deleteCommand(), rolloutCommand(), adapterCommand(), logsCommand(), devCommand(), modelCommand(), tlsCommand(), keyringCommand(), operatorCommand(), apikeyCommand(), versionCommand(), genDocsCommand()},
	}
}

func logger(c *cli.Context) *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}
