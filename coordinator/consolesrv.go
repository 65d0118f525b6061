package coordinator

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/shoalhq/shoal/coordinator/console"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
)

// ConsoleConfig turns the web console on (docs/design/console.md).
type ConsoleConfig struct {
	// Addr is where it listens (host:port).
	Addr string
	// Cleartext serves plain HTTP even though the coordinator has TLS: for
	// a loopback address only (shoal dev), since a token would otherwise
	// cross the network in the clear.
	Cleartext bool
}

// checkConsole refuses a console that would be open or in the clear
// beyond this machine.
func checkConsole(cc *ConsoleConfig, secured bool) error {
	host, _, err := net.SplitHostPort(cc.Addr)
	if err != nil {
		return fmt.Errorf("--console %q: want host:port: %w", cc.Addr, err)
	}
	ip := net.ParseIP(host)
	loopback := host == "localhost" || (ip != nil && ip.IsLoopback())
	switch {
	case loopback:
		return nil
	case !secured:
		return fmt.Errorf("--console %s: this coordinator runs --insecure, so the console would be open to anyone who reaches %s; "+
			"give it a loopback address (127.0.0.1:PORT, and an SSH tunnel), or run the coordinator with TLS", cc.Addr, host)
	case cc.Cleartext:
		return fmt.Errorf("--console %s with --console-cleartext: tokens would cross the network in the clear; "+
			"drop --console-cleartext (the console then serves HTTPS with the coordinator's certificate) or listen on 127.0.0.1", cc.Addr)
	}
	return nil
}

// startConsole serves the console until ctx ends; stop waits for it. The
// console reads the coordinator API the CLI uses, through an in-memory
// connection to the same service (the forwarding and consistent reads of
// a replicated coordinator included); the browser is authenticated as the
// API authenticates the CLI (security.TLS.HTTPCaller) before any call.
func (c *Coordinator) startConsole(ctx context.Context, chat http.Handler) (stop func(), err error) {
	cc := c.cfg.Console
	ln, err := net.Listen("tcp", cc.Addr)
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	mem := bufconn.Listen(1 << 20)
	inner := grpc.NewServer(grpc.ChainUnaryInterceptor(c.forward))
	coordv1.RegisterCoordinatorServer(inner, &apiServer{c: c})
	conn, err := grpc.NewClient("passthrough:///console", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return mem.DialContext(ctx) }))
	if err != nil {
		ln.Close()
		return nil, err
	}
	secure := c.cfg.TLS != nil && !cc.Cleartext
	cons := console.New(console.Config{API: coordv1.NewCoordinatorClient(conn), Chat: chat, Secure: secure, Log: c.log, StaleHeader: StaleHeader,
		Auth: func(r *http.Request, tok string) (string, error) {
			who, err := c.cfg.TLS.HTTPCaller(r, tok)
			return who.Name, err
		}})
	srv := &http.Server{Handler: cons.Handler(), ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:    slog.NewLogLogger(c.log.Handler(), slog.LevelDebug), // failed handshakes, cleartext to HTTPS
		BaseContext: func(net.Listener) context.Context { return ctx }}
	serve := ln
	if secure {
		cfg := c.cfg.TLS.HTTPServerConfig()
		serve = tls.NewListener(ln, cfg)
	}
	cctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); _ = inner.Serve(mem) }()
	go func() { defer wg.Done(); cons.Run(cctx) }()
	go func() {
		defer wg.Done()
		if err := srv.Serve(serve); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.log.Error("console stopped", "err", err)
		}
	}()
	scheme := "https"
	if !secure {
		scheme = "http"
	}
	c.log.Info("console serving", "url", scheme+"://"+ln.Addr().String()+"/")
	return func() {
		cancel()
		sctx, done := context.WithTimeout(context.Background(), 3*time.Second)
		_ = srv.Shutdown(sctx)
		done()
		_ = srv.Close()
		conn.Close()
		inner.Stop()
		wg.Wait()
	}, nil
}
