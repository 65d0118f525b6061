package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/shoalhq/shoal/internal/devcluster"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/security"
	"github.com/urfave/cli/v2"
)

// packagedSim is where the .deb and .rpm install the simulator.
const packagedSim = "/usr/lib/shoal/shoal-sim"

func devCommand() *cli.Command {
	return &cli.Command{
		Name:  "dev",
		Usage: "run a whole cluster on this machine: a coordinator and agents on 127.0.0.x, serving the simulator",
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "agents", Value: 5, EnvVars: []string{"SHOAL_DEV_AGENTS"}, Usage: "agents to start (the demo uses 4, the rest are spares)"},
			&cli.StringFlag{Name: "dir", EnvVars: []string{"SHOAL_DEV_DIR"}, Usage: "working directory (default: a new temp dir)"},
			&cli.StringFlag{Name: "sim", EnvVars: []string{"SHOAL_SIM_BIN"}, Usage: "shoal-sim binary (default: next to shoal, else " + packagedSim + ")"},
			&cli.StringFlag{Name: "router", Value: "127.0.0.1:8080", EnvVars: []string{"SHOAL_ROUTER_ADDR"}},
			&cli.StringFlag{Name: "api", Value: "127.0.0.1:7950", EnvVars: []string{"SHOAL_API_ADDR"}},
			&cli.StringFlag{Name: "net", Value: "127.0.0", EnvVars: []string{"SHOAL_DEV_NET"}, Usage: "the loopback /24 the cluster lives on: the coordinator gossips on .1, agents on .2, .3, … (two dev clusters on one machine need two nets and two sets of ports)"},
			&cli.IntFlag{Name: "gossip-port", Value: 7946, EnvVars: []string{"SHOAL_DEV_GOSSIP_PORT"}, Usage: "the coordinator's gossip port"},
			&cli.StringFlag{Name: "console", Value: "127.0.0.1:7952", EnvVars: []string{"SHOAL_CONSOLE_ADDR"}, Usage: "the web console (\"\" off); its address, with a login link, is printed when the cluster is up"},
			&cli.StringFlag{Name: "metrics-addr", Value: "127.0.0.1:7951", EnvVars: []string{"SHOAL_METRICS_ADDR"}, Usage: "coordinator /metrics and Prometheus service discovery"},
			&cli.Float64Flag{Name: "load-seconds", Value: 3, EnvVars: []string{"SHOAL_SIM_LOAD_SECONDS"}, Usage: "simulated weight-load time"},
			&cli.BoolFlag{Name: "no-deploy", Usage: "start the cluster without applying the demo deployment"},
			&cli.StringFlag{Name: "shape", Value: "tp-pp", EnvVars: []string{"SHOAL_DEV_SHAPE"},
				Usage: "the demo deployment: tp-pp (TP8×PP2 over Ray, the seed's), wide-ep (DeepSeek-R1 as DP16×EP, a server per node) or pd (prefill and decode roles, disaggregated)"},
		},
		Action: runDev,
	}
}

func runDev(c *cli.Context) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	sim := c.String("sim")
	if sim == "" {
		// Next to shoal (a checkout's bin/), else where the package puts it.
		sim = filepath.Join(filepath.Dir(self), "shoal-sim")
		if _, err := os.Stat(sim); err != nil {
			if _, err := os.Stat(packagedSim); err == nil {
				sim = packagedSim
			}
		}
	}
	if _, err := os.Stat(sim); err != nil {
		return fmt.Errorf("shoal dev runs its engines on the simulator, %s, which is not there: "+
			"in a checkout, `make build` puts it in bin/ next to bin/shoal; the package installs it as %s; or pass --sim PATH (docs/try-without-gpus.md)", sim, packagedSim)
	}
	spec, what, ok := demoShape(c.String("shape"))
	if !ok {
		return fmt.Errorf("--shape %q: one of tp-pp, wide-ep, pd", c.String("shape"))
	}
	nw := strings.TrimSuffix(c.String("net"), ".")
	if ip := net.ParseIP(nw + ".1"); ip == nil || !ip.IsLoopback() || strings.Count(nw, ".") != 2 {
		return fmt.Errorf("--net %q: give the first three numbers of a loopback address, 127.0.N", c.String("net"))
	}
	dir := c.String("dir")
	if dir == "" {
		if dir, err = os.MkdirTemp("", "shoal-dev-"); err != nil {
			return err
		}
	}
	out := c.App.Writer
	fmt.Fprintf(out, "shoal dev: cluster files in %s\n", dir)
	cl, err := devcluster.Start(devcluster.Config{Dir: dir, ShoalBin: self, SimBin: sim, Agents: c.Int("agents"),
		APIAddr: c.String("api"), RouterAddr: c.String("router"), MetricsAddr: c.String("metrics-addr"), AgentMetrics: true, Log: out,
		ConsoleAddr: c.String("console"), IPPrefix: nw + ".", CoordIP: nw + ".1", GossipPort: c.Int("gossip-port"),
		SimEnv: []string{fmt.Sprintf("SHOAL_SIM_LOAD_SECONDS=%g", c.Float64("load-seconds"))}})
	if err != nil {
		return err
	}
	// The CLI on this machine finds the dev cluster's credentials here.
	if d := cl.ClientTLSDir(); d != "" {
		_ = os.WriteFile(devPointer(), []byte(d), 0o600)
		defer os.Remove(devPointer())
	}
	defer func() {
		fmt.Fprintln(out, "shoal dev: stopping agents, engines and coordinator…")
		cl.Stop()
		fmt.Fprintln(out, "shoal dev: stopped")
	}()
	console := ""
	if a := c.String("console"); a != "" {
		console = "http://" + a + "/"
		if tok := cl.ConsoleToken(); tok != "" {
			console += "#token=" + tok // the fragment never leaves the browser; the page logs in with it
		}
	}
	if c.Bool("no-deploy") {
		fmt.Fprintf(out, "ready: coordinator API %s (no deployment applied); Ctrl-C to stop\n", c.String("api"))
		if console != "" {
			fmt.Fprintf(out, "console: %s\n", console)
		}
		<-c.Context.Done()
		return nil
	}
	if err := devApply(c.Context, c.String("api"), cl.ClientTLSDir(), spec, what, out); err != nil {
		return err
	}
	router := "http://" + c.String("router")
	start := time.Now()
	last := time.Time{}
	for {
		if err := completion(c.Context, router); err == nil {
			break
		} else if time.Since(last) > 5*time.Second {
			fmt.Fprintf(out, "waiting for a replica to serve (%ds): %v\n", int(time.Since(start).Seconds()), err)
			last = time.Now()
		}
		select {
		case <-c.Context.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
		if time.Since(start) > 3*time.Minute {
			return fmt.Errorf("no replica served within 3 minutes; see the logs in %s/logs", dir)
		}
	}
	if console != "" {
		console = "console: " + console + "\n"
	}
	fmt.Fprintf(out, `
ready: %s (first completion after %.1fs)
%s
Try it:
  curl -s %s/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"demo","messages":[{"role":"user","content":"Hello!"}],"max_tokens":32}'
  ./bin/shoal get replicas      ./bin/shoal get nodes      ./bin/shoal describe deployment demo

Ctrl-C stops everything.
`, router, time.Since(start).Seconds(), console, router)
	<-c.Context.Done()
	return nil
}

// demoShape is the demo deployment of a --shape, and what to say of it.
func demoShape(shape string) (spec, what string, ok bool) {
	switch shape {
	case "", "tp-pp":
		return devcluster.DemoSpec, "2 replicas × 2 nodes × 8 GPUs (TP8×PP2 over Ray, simulated)", true
	case "wide-ep":
		return devcluster.WideEPDemoSpec, "2 replicas × 2 nodes × 8 GPUs (DeepSeek-R1 as DP16×EP, vLLM hybrid load balancing, simulated)", true
	case "pd":
		return devcluster.PDDemoSpec, "disaggregated: 1 prefill + 2 decode replicas × 1 node × 8 GPUs (vLLM NixlConnector, simulated)", true
	}
	return "", "", false
}

func devApply(ctx context.Context, api, tlsDir, spec, what string, out io.Writer) error {
	var tl *security.TLS
	if tlsDir != "" {
		var err error
		if tl, err = security.Load(security.Options{Dir: tlsDir, Role: security.RoleCLI}); err != nil {
			return err
		}
	}
	conn, err := tl.Dial(api)
	if err != nil {
		return err
	}
	defer conn.Close()
	cl := coordv1.NewCoordinatorClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		actx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err := cl.Apply(actx, &coordv1.ApplyRequest{SpecYaml: []byte(spec)})
		cancel()
		if err == nil {
			fmt.Fprintln(out, "applied deployment demo: "+what)
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("apply demo deployment: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func completion(ctx context.Context, base string) error {
	body := []byte(`{"model":"demo","messages":[{"role":"user","content":"ping"}],"max_tokens":1}`)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != 200 {
		return fmt.Errorf("router answered %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	return nil
}
