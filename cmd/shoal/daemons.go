package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/shoalhq/shoal/agent"
	"github.com/shoalhq/shoal/coordinator"
	"github.com/shoalhq/shoal/coordinator/replicate"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/gpu"
	"github.com/shoalhq/shoal/internal/bytesize"
	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/shoalhq/shoal/security"
	"github.com/urfave/cli/v2"
)

func agentCommand() *cli.Command {
	cmd := &cli.Command{
		Name:        "agent",
		Usage:       "run the agent on a GPU host (normally under systemd)",
		Subcommands: []*cli.Command{inspectCommand()},
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", EnvVars: []string{"SHOAL_AGENT_CONFIG"}, Usage: "YAML config file; flags override it"},
			&cli.StringFlag{Name: "node-id", EnvVars: []string{"SHOAL_NODE_ID"}, Usage: "node id (default: hostname)"},
			&cli.StringFlag{Name: "cluster", EnvVars: []string{"SHOAL_CLUSTER"}, Usage: "cluster name (default shoal)"},
			&cli.StringFlag{Name: "address", EnvVars: []string{"SHOAL_ADDRESS"}, Usage: "this host's IP: gossip, gRPC and engines bind it"},
			&cli.StringSliceFlag{Name: "join", EnvVars: []string{"SHOAL_JOIN"}, Usage: "gossip address of a node to join (repeatable)"},
			&cli.IntFlag{Name: "gossip-port", EnvVars: []string{"SHOAL_GOSSIP_PORT"}, Usage: "gossip port, UDP and TCP (default 7946)"},
			&cli.IntFlag{Name: "grpc-port", EnvVars: []string{"SHOAL_GRPC_PORT"}, Usage: "Agent API port (default 7947)"},
			&cli.IntFlag{Name: "replica-port", EnvVars: []string{"SHOAL_REPLICA_PORT"}, Usage: "Replica API port, open on heads only (default 7948)"},
			&cli.StringFlag{Name: "metrics-addr", EnvVars: []string{"SHOAL_METRICS_ADDR"}, Usage: "Prometheus /metrics address"},
			&cli.StringFlag{Name: "gossip-profile", EnvVars: []string{"SHOAL_GOSSIP_PROFILE"}, Usage: "lan (default), local or fast"},
			&cli.StringFlag{Name: "state-dir", EnvVars: []string{"SHOAL_STATE_DIR"}, Usage: "identity, assignment, engine logs (default /var/lib/shoal)"},
			&cli.StringFlag{Name: "gpu-backend", EnvVars: []string{"SHOAL_GPU_BACKEND"}, Usage: "nvml (default), none, or mock:h200x8"},
			&cli.IntSliceFlag{Name: "gpus", EnvVars: []string{"SHOAL_GPUS"}, Usage: "indices of the host's GPUs this agent owns (default: all)"},
			&cli.BoolFlag{Name: "slurm", EnvVars: []string{"SHOAL_SLURM"}, Usage: "run as a task of a Slurm job step (srun --ntasks-per-node=1): node id, GPUs, port band and end time come from the job"},
			&cli.StringFlag{Name: "ray-bin", EnvVars: []string{"SHOAL_RAY_BIN"}, Usage: "the ray executable (default ray on PATH)"},
			&cli.StringFlag{Name: "vllm-bin", EnvVars: []string{"SHOAL_VLLM_BIN"}, Usage: "the vllm executable (default vllm on PATH)"},
			&cli.StringFlag{Name: "python-bin", EnvVars: []string{"SHOAL_PYTHON_BIN"}, Usage: "python for `-m sglang.launch_server` (default python3)"},
			&cli.StringFlag{Name: "engine-host", EnvVars: []string{"SHOAL_ENGINE_HOST"}, Usage: "address vLLM binds (default: --address)"},
			&cli.DurationFlag{Name: "stop-grace", EnvVars: []string{"SHOAL_STOP_GRACE"}, Usage: "SIGTERM to SIGKILL for engines (default 30s)"},
			&cli.DurationFlag{Name: "restart-backoff", EnvVars: []string{"SHOAL_RESTART_BACKOFF"}, Usage: "first wait before a failed group restarts; doubles to 5m (default 5s)"},
			&cli.DurationFlag{Name: "canary-interval", EnvVars: []string{"SHOAL_CANARY_INTERVAL"},
				Usage: "send a one-token completion to an idle head this often (default 30s)"},
			&cli.DurationFlag{Name: "hang-timeout", EnvVars: []string{"SHOAL_HANG_TIMEOUT"},
				Usage: "restart a replica whose engine runs requests but generates no token this long (default 60s)"},
			&cli.StringFlag{Name: "models-dir", EnvVars: []string{"SHOAL_MODELS_DIR"}, Usage: "where pulled weights live, one directory per model (default STATE_DIR/models)"},
			&cli.BoolFlag{Name: "skip-local-model-check", EnvVars: []string{"SHOAL_SKIP_LOCAL_MODEL_CHECK"}, Usage: "start engines on local model paths without checking them (simulator clusters)"},
			&cli.BoolFlag{Name: "stop-engines-on-exit", EnvVars: []string{"SHOAL_STOP_ENGINES_ON_EXIT"},
				Usage: "stop engines when the agent exits (default: they keep serving and the next agent process adopts them)"},
			&cli.StringSliceFlag{Name: "engine-env", EnvVars: []string{"SHOAL_ENGINE_ENV"}, Usage: "KEY=VALUE added to every engine's environment (repeatable; engines inherit nothing else but PATH, HOME, locale)"},
			&cli.StringFlag{Name: "containerd-address", EnvVars: []string{"SHOAL_CONTAINERD_ADDRESS"}, Usage: "containerd socket for engine.runtime: containerd (default /run/containerd/containerd.sock)"},
			&cli.StringFlag{Name: "containerd-namespace", EnvVars: []string{"SHOAL_CONTAINERD_NAMESPACE"}, Usage: "containerd namespace of engine containers (default shoal)"},
			&cli.StringFlag{Name: "log-max-size", EnvVars: []string{"SHOAL_LOG_MAX_SIZE"}, Usage: "rotate an engine log past this size, 3 old files kept (default 100Mi; " + bytesize.Units + ")"},
		},
		Action: func(c *cli.Context) error {
			cfg, err := agentConfig(c)
			if err != nil {
				return err
			}
			cfg.Logger = logger(c)
			if cfg.Slurm {
				al, err := slurmAlloc()
				if err != nil {
					return err
				}
				slurmAgentConfig(c, &cfg, al, &slurm.CLI{})
				cfg.Logger = cfg.Logger.With("slurm_job", al.JobID)
			}
			ins, err := gpu.New(cfg.GPUBackend)
			if err != nil {
				return err
			}
			if cfg.TLS, cfg.GossipKeys, cfg.GossipKeyFile, err = daemonSecurity(c, security.RoleAgent, cfg.Logger, nil, cfg.GossipKeyFile); err != nil {
				return err
			}
			cfg.Ready = sdReady(cfg.Logger)
			a, err := agent.New(cfg, ins, nil)
			if err != nil {
				return err
			}
			defer sdStopping()
			ctx := c.Context
			if cfg.Slurm {
				var stop func()
				ctx, stop = slurmSignals(ctx, a, cfg.Logger)
				defer stop()
			}
			return a.Run(ctx)
		},
	}
	cmd.Flags = append(cmd.Flags, modelSourceFlags()...)
	cmd.Flags = append(cmd.Flags, securityFlags()...)
	return cmd
}

func coordinatorCommand() *cli.Command {
	cmd := &cli.Command{
		Name:  "coordinator",
		Usage: "run the coordinator: store, placement, reconciler, API and router",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "node-id", Value: "coordinator", EnvVars: []string{"SHOAL_NODE_ID"}},
			&cli.StringFlag{Name: "cluster", Value: "shoal", EnvVars: []string{"SHOAL_CLUSTER"}},
			&cli.StringFlag{Name: "address", Value: "127.0.0.1", EnvVars: []string{"SHOAL_ADDRESS"}, Usage: "IP to gossip on"},
			&cli.IntFlag{Name: "gossip-port", Value: 7946, EnvVars: []string{"SHOAL_GOSSIP_PORT"}},
			&cli.StringSliceFlag{Name: "join", EnvVars: []string{"SHOAL_JOIN"}},
			&cli.StringFlag{Name: "gossip-profile", EnvVars: []string{"SHOAL_GOSSIP_PROFILE"}},
			&cli.StringFlag{Name: "api", Value: "127.0.0.1:7950", EnvVars: []string{"SHOAL_API_ADDR"}, Usage: "gRPC API address for the CLI"},
			&cli.StringFlag{Name: "metrics-addr", Value: "127.0.0.1:7951", EnvVars: []string{"SHOAL_METRICS_ADDR"}, Usage: "shoal's /metrics and Prometheus service discovery (/v1/sd/engines, /v1/sd/agents); \"\" disables"},
			&cli.StringFlag{Name: "router", Value: "127.0.0.1:8080", EnvVars: []string{"SHOAL_ROUTER_ADDR"}, Usage: "OpenAI HTTP address (\"\" disables)"},
			&cli.StringFlag{Name: "data-dir", Value: "/var/lib/shoal-coordinator", EnvVars: []string{"SHOAL_DATA_DIR"}},
			&cli.StringFlag{Name: "cli-tokens-file", EnvVars: []string{"SHOAL_CLI_TOKENS_FILE"}, Usage: "hashed CLI tokens, \"NAME SHA256\" per line (`shoal tls token create`); reloaded on SIGHUP"},
			&cli.StringFlag{Name: "console", EnvVars: []string{"SHOAL_CONSOLE_ADDR"},
				Usage: "serve the web console on this host:port (off when empty): HTTPS with the coordinator's certificate, logged in with a CLI token or a cli certificate; an --insecure coordinator serves it on a loopback address only"},
			&cli.BoolFlag{Name: "console-cleartext", EnvVars: []string{"SHOAL_CONSOLE_CLEARTEXT"},
				Usage: "serve the console over plain HTTP though the coordinator has TLS (a loopback --console only; shoal dev)"},
			&cli.StringFlag{Name: "raft-addr", EnvVars: []string{"SHOAL_RAFT_ADDR"},
				Usage: "replicate the store over Raft with the other coordinators, on this host:port (\"\": a single coordinator)"},
			&cli.StringSliceFlag{Name: "servers", EnvVars: []string{"SHOAL_SERVERS"},
				Usage: "the initial Raft servers, node-id=host:port each (their --node-id and --raft-addr), this one included; the same list on every server. Empty: resume the group in --data-dir, or wait to be added (`shoal operator raft add-peer`)"},
			&cli.StringFlag{Name: "raft-profile", Value: "lan", EnvVars: []string{"SHOAL_RAFT_PROFILE"},
				Usage: "Raft timeouts: lan (a leader's loss noticed in 0.5–1 s) or wan (hashicorp/raft's defaults, 1–2 s)"},
			apiKeysFlag, noAPIKeysFlag, idleTimeoutFlag, totalTimeoutFlag, holdForFlag, retriesFlag, ejectAfterFlag, kvIndexBlocksFlag, holdPrefillTokensFlag, holdPrefillMaxFlag,
			allowedOriginsFlag, allowedMethodsFlag, allowedHeadersFlag, allowCredentialsFlag,
			&cli.BoolFlag{Name: "slurm", EnvVars: []string{"SHOAL_SLURM"},
				Usage: "serve Slurm-sourced deployments (spec.slurm): submit one job per replica with sbatch, read squeue, cancel with scancel (Slurm's commands on PATH and its SLURM_CONF)"},
			&cli.StringFlag{Name: "slurm-agent-command", EnvVars: []string{"SHOAL_SLURM_AGENT_COMMAND"},
				Usage: "what each node of a job runs under `srun --ntasks-per-node=1`: `shoal agent --slurm --join HOST:PORT` and the agent's flags (required with --slurm)"},
			&cli.DurationFlag{Name: "slurm-interval", Value: 3 * time.Second, EnvVars: []string{"SHOAL_SLURM_INTERVAL"}, Usage: "how often Slurm's queue is read"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return fmt.Errorf("unexpected arguments %v", c.Args().Slice())
			}
			if api, rt := c.String("api"), c.String("router"); rt != "" && samePort(api, rt) {
				return fmt.Errorf("--api %s and --router %s share a port: the admin API never shares one with the public OpenAI router", api, rt)
			}
			rc, err := routerConfig(c, c.String("router") != "")
			if err != nil {
				return err
			}
			log := logger(c)
			warnOpen(c, log)
			var tl *security.TLS
			loadTokens := func() {
				p := c.String("cli-tokens-file")
				if p == "" || tl == nil {
					return
				}
				tk, err := security.LoadTokens(p)
				if err != nil {
					log.Error("CLI tokens not (re)loaded", "file", p, "err", err)
					return
				}
				tl.SetTokens(tk)
			}
			rk := reloadKeys(c, rc, log)
			tl, keys, kf, err := daemonSecurity(c, security.RoleCoordinator, log, func() { loadTokens(); rk() }, "")
			if err != nil {
				return err
			}
			if p := c.String("cli-tokens-file"); p != "" {
				if _, err := security.LoadTokens(p); err != nil {
					return fmt.Errorf("--cli-tokens-file: %w", err)
				}
			}
			loadTokens()
			servers, err := replicate.ParseServers(c.StringSlice("servers"))
			if err != nil {
				return fmt.Errorf("--servers: %w", err)
			}
			if len(servers) > 0 && c.String("raft-addr") == "" {
				return errors.New("--servers needs --raft-addr (this server's Raft address, as the list names it)")
			}
			sl, err := coordinatorSlurm(c)
			if err != nil {
				return err
			}
			co := coordinator.New(coordinator.Config{RaftAddr: c.String("raft-addr"), Servers: servers, RaftProfile: c.String("raft-profile"), NodeID: c.String("node-id"), Cluster: c.String("cluster"), Address: c.String("address"),
				GossipPort: c.Int("gossip-port"), Join: c.StringSlice("join"), GossipProfile: c.String("gossip-profile"),
				APIAddr: c.String("api"), RouterAddr: c.String("router"), MetricsAddr: c.String("metrics-addr"), DataDir: c.String("data-dir"), Router: rc, Logger: log,
				TLS: tl, GossipKeys: keys, GossipKeyFile: kf, Ready: sdReady(log), Slurm: sl, Console: consoleConfig(c)})
			defer sdStopping()
			return co.Run(c.Context)
		},
	}
	cmd.Flags = append(cmd.Flags, securityFlags()...)
	return cmd
}

// consoleConfig is the console's flags (nil: off).
func consoleConfig(c *cli.Context) *coordinator.ConsoleConfig {
	if c.String("console") == "" {
		return nil
	}
	return &coordinator.ConsoleConfig{Addr: c.String("console"), Cleartext: c.Bool("console-cleartext")}
}

var idleTimeoutFlag = &cli.DurationFlag{Name: "idle-timeout", Value: 10 * time.Minute, EnvVars: []string{"SHOAL_ROUTER_IDLE_TIMEOUT"},
	Usage: "end a response when the engine sends nothing for this long"}

var totalTimeoutFlag = &cli.DurationFlag{Name: "total-timeout", EnvVars: []string{"SHOAL_ROUTER_TOTAL_TIMEOUT"},
	Usage: "bound a whole request: 504 if no answer began, the stream ended if one did (0: none, so long reasoning streams are never cut)"}

var holdForFlag = &cli.DurationFlag{Name: "hold-for", Value: 30 * time.Second, EnvVars: []string{"SHOAL_ROUTER_HOLD_FOR"},
	Usage: "hold a request for a model with no ready replica this long (scale from zero, restarts) before answering 503"}

var retriesFlag = &cli.IntFlag{Name: "retries", Value: 2, EnvVars: []string{"SHOAL_ROUTER_RETRIES"},
	Usage: "more attempts a request gets, each at another replica, when one fails before any byte of the answer reached the client (no connection, reset, 5xx, 429); 0: none"}

var kvIndexBlocksFlag = &cli.IntFlag{Name: "kv-index-blocks", Value: router.DefaultKVIndexBlocks, EnvVars: []string{"SHOAL_ROUTER_KV_INDEX_BLOCKS"},
	Usage: "KV-cache blocks the router indexes from the engines' KV events at most (40 bytes each; past it, new stores go unindexed and are counted)"}

var holdPrefillTokensFlag = &cli.IntFlag{Name: "hold-prefill-tokens", Value: router.DefaultHoldPrefillTokens, EnvVars: []string{"SHOAL_ROUTER_HOLD_PREFILL_TOKENS"},
	Usage: "prefix-cache: a request whose prompt no replica has cached (by the engines' KV events) waits at the router while every replica has this many of the router's prompt tokens not yet prefilled, and goes, first come first served, to the first with room (0: never waits)"}

var holdPrefillMaxFlag = &cli.DurationFlag{Name: "hold-prefill-max", Value: 30 * time.Second, EnvVars: []string{"SHOAL_ROUTER_HOLD_PREFILL_MAX"},
	Usage: "the longest a request waits for room under --hold-prefill-tokens; past it, it is routed as if there were room"}

var ejectAfterFlag = &cli.IntFlag{Name: "eject-after", Value: 5, EnvVars: []string{"SHOAL_ROUTER_EJECT_AFTER"},
	Usage: "failures in a row (refused, reset, 5xx) that take a replica out of routing for 5 s × its recent ejections (at most 5 min)"}

// The CORS flags are vLLM's (its defaults: every origin, method and header,
// no credentials).
var (
	allowedOriginsFlag = &cli.StringSliceFlag{Name: "allowed-origins", EnvVars: []string{"SHOAL_ROUTER_ALLOWED_ORIGINS"},
		Usage: "origins browsers may call the router from (repeatable or comma-separated; default *, as vLLM)"}
	allowedMethodsFlag = &cli.StringSliceFlag{Name: "allowed-methods", EnvVars: []string{"SHOAL_ROUTER_ALLOWED_METHODS"},
		Usage: "methods a cross-origin request may use (default *)"}
	allowedHeadersFlag = &cli.StringSliceFlag{Name: "allowed-headers", EnvVars: []string{"SHOAL_ROUTER_ALLOWED_HEADERS"},
		Usage: "headers a cross-origin request may send (default *)"}
	allowCredentialsFlag = &cli.BoolFlag{Name: "allow-credentials", EnvVars: []string{"SHOAL_ROUTER_ALLOW_CREDENTIALS"},
		Usage: "let cross-origin requests carry credentials (the allowed origin is then echoed, never *)"}
)

var apiKeysFlag = &cli.StringFlag{Name: "api-keys-file", EnvVars: []string{"SHOAL_API_KEYS_FILE"},
	Usage: "hashed API keys with their models and rate limits (`shoal apikey create`); OpenAI requests need `Authorization: Bearer KEY`; reloaded on SIGHUP (default " + defaultAPIKeys + " if present; without keys the router refuses to start unless --no-api-keys)"}

var noAPIKeysFlag = &cli.BoolFlag{Name: "no-api-keys", EnvVars: []string{"SHOAL_NO_API_KEYS"},
	Usage: "serve OpenAI requests without API keys: anyone who reaches the router may use every model (trusted networks, `shoal dev`)"}

// warnOpen says loudly that the router serves without keys.
func warnOpen(c *cli.Context, log *slog.Logger) {
	if c.Bool("no-api-keys") {
		log.Warn("OPEN: the router serves OpenAI requests without API keys because --no-api-keys was given; anyone who reaches it may use every model")
	}
}

// routerConfig reads the router's flags. A router (enabled) needs API keys:
// --api-keys-file, else the default file if present, unless --no-api-keys.
func routerConfig(c *cli.Context, enabled bool) (router.Config, error) {
	rc := router.Config{IdleTimeout: c.Duration("idle-timeout"), TotalTimeout: c.Duration("total-timeout"), HoldFor: c.Duration("hold-for")}
	if rc.IdleTimeout < 0 || rc.TotalTimeout < 0 {
		return rc, fmt.Errorf("--idle-timeout and --total-timeout must not be negative")
	}
	switch n := c.Int("retries"); {
	case n < 0 || n > 10:
		return rc, fmt.Errorf("--retries %d: give 0 (none) to 10", n)
	case n == 0:
		rc.Retries = -1
	default:
		rc.Retries = n
	}
	rc.CORS = router.CORS{Origins: c.StringSlice("allowed-origins"), Methods: c.StringSlice("allowed-methods"),
		Headers: c.StringSlice("allowed-headers"), Credentials: c.Bool("allow-credentials")}
	rc.EjectAfter = c.Int("eject-after")
	if rc.EjectAfter < 1 {
		return rc, fmt.Errorf("--eject-after %d: give at least 1", rc.EjectAfter)
	}
	if rc.KVIndexBlocks = c.Int("kv-index-blocks"); rc.KVIndexBlocks < 1 {
		return rc, fmt.Errorf("--kv-index-blocks %d: give at least 1", rc.KVIndexBlocks)
	}
	switch n := c.Int("hold-prefill-tokens"); {
	case n < 0:
		return rc, fmt.Errorf("--hold-prefill-tokens %d: give a number of tokens, or 0 to never hold a request", n)
	case n == 0:
		rc.HoldPrefillTokens = -1
	default:
		rc.HoldPrefillTokens = n
	}
	if rc.HoldPrefillMax = c.Duration("hold-prefill-max"); rc.HoldPrefillMax <= 0 {
		return rc, fmt.Errorf("--hold-prefill-max %v: give a positive duration (to never hold, --hold-prefill-tokens 0)", rc.HoldPrefillMax)
	}
	p := apiKeysPath(c)
	switch {
	case p != "" && c.Bool("no-api-keys"):
		return rc, fmt.Errorf("--no-api-keys and an API keys file (%s) contradict each other: give one", p)
	case p != "":
		keys, err := router.LoadAPIKeys(p)
		if err != nil {
			return rc, err
		}
		rc.APIKeys = keys
	case enabled && !c.Bool("no-api-keys"):
		return rc, fmt.Errorf("the router would serve anyone: create a key with `shoal apikey create --name NAME --models '*' --file %s` (then the router finds it), pass --api-keys-file, or pass --no-api-keys on a trusted network", defaultAPIKeys)
	}
	return rc, nil
}

// apiKeysPath is --api-keys-file, else the default file when it exists.
func apiKeysPath(c *cli.Context) string {
	if p := c.String("api-keys-file"); p != "" {
		return p
	}
	if _, err := os.Stat(defaultAPIKeys); err == nil {
		return defaultAPIKeys
	}
	return ""
}

// reloadKeys re-reads --api-keys-file into the running router (SIGHUP).
func reloadKeys(c *cli.Context, rc router.Config, log *slog.Logger) func() {
	return func() {
		p := apiKeysPath(c)
		if p == "" || rc.APIKeys == nil {
			return
		}
		keys, err := router.LoadAPIKeys(p)
		if err != nil {
			log.Error("SIGHUP: API keys not reloaded; keeping the old ones", "err", err)
			return
		}
		rc.APIKeys.Replace(keys)
		log.Info("SIGHUP: API keys reloaded", "file", p)
	}
}

func routerCommand() *cli.Command {
	cmd := &cli.Command{
		Name:  "router",
		Usage: "run an OpenAI router alone: joins the gossip, watches the heads, keeps routing while the coordinator is down",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "node-id", Value: "router", EnvVars: []string{"SHOAL_NODE_ID"}},
			&cli.StringFlag{Name: "cluster", Value: "shoal", EnvVars: []string{"SHOAL_CLUSTER"}},
			&cli.StringFlag{Name: "address", Value: "127.0.0.1", EnvVars: []string{"SHOAL_ADDRESS"}, Usage: "IP to gossip on"},
			&cli.IntFlag{Name: "gossip-port", Value: 7946, EnvVars: []string{"SHOAL_GOSSIP_PORT"}},
			&cli.StringSliceFlag{Name: "join", EnvVars: []string{"SHOAL_JOIN"}, Usage: "gossip address of any cluster node (required)"},
			&cli.StringFlag{Name: "gossip-profile", EnvVars: []string{"SHOAL_GOSSIP_PROFILE"}},
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8080", EnvVars: []string{"SHOAL_ROUTER_ADDR"}, Usage: "OpenAI HTTP address"},
			&cli.StringSliceFlag{Name: "backend", EnvVars: []string{"SHOAL_ROUTER_BACKENDS"},
				Usage: "static [prefill:|decode:]MODEL=HOST:PORT backend (repeatable), e.g. an existing vLLM server; no gossip needed. A model with prefill: backends is served disaggregated (vLLM NixlConnector engines): prefilled on one, decoded on a decode: one"},
			apiKeysFlag, noAPIKeysFlag, idleTimeoutFlag, totalTimeoutFlag, holdForFlag, retriesFlag, ejectAfterFlag, kvIndexBlocksFlag, holdPrefillTokensFlag, holdPrefillMaxFlag,
			allowedOriginsFlag, allowedMethodsFlag, allowedHeadersFlag, allowCredentialsFlag,
		},
		Action: func(c *cli.Context) error {
			rc, err := routerConfig(c, true)
			if err != nil {
				return err
			}
			warnOpen(c, logger(c))
			if bs := c.StringSlice("backend"); len(bs) > 0 {
				return router.RunStatic(c.Context, c.String("listen"), bs, rc, logger(c))
			}
			log := logger(c)
			tl, keys, kf, err := daemonSecurity(c, security.RoleRouter, log, reloadKeys(c, rc, log), "")
			if err != nil {
				return err
			}
			return router.RunStandalone(c.Context, router.StandaloneConfig{NodeID: c.String("node-id"), Cluster: c.String("cluster"),
				Address: c.String("address"), GossipPort: c.Int("gossip-port"), Join: c.StringSlice("join"),
				GossipProfile: c.String("gossip-profile"), Listen: c.String("listen"), Router: rc, Logger: log,
				TLS: tl, GossipKeys: keys, GossipKeyFile: kf, Ready: sdReady(log)})
		},
	}
	cmd.Flags = append(cmd.Flags, securityFlags()...)
	return cmd
}

// samePort says whether two listen addresses would share a socket.
func samePort(a, b string) bool {
	ha, pa, err1 := net.SplitHostPort(a)
	hb, pb, err2 := net.SplitHostPort(b)
	if err1 != nil || err2 != nil || pa != pb {
		return false
	}
	wild := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	return ha == hb || wild(ha) || wild(hb)
}

// agentConfig is the agent's configuration: its --config file, then every
// flag given on top (a flag wins over the file's key; TestAgentConfigKeys
// checks each key against its flag).
func agentConfig(c *cli.Context) (agent.Config, error) {
	var cfg agent.Config
	if p := c.String("config"); p != "" {
		var err error
		if cfg, err = agent.LoadConfigFile(p); err != nil {
			return cfg, err
		}
	}
	setStr := func(dst *string, name string) {
		if c.IsSet(name) {
			*dst = c.String(name)
		}
	}
	setInt := func(dst *int, name string) {
		if c.IsSet(name) {
			*dst = c.Int(name)
		}
	}
	setStr(&cfg.NodeID, "node-id")
	setStr(&cfg.Cluster, "cluster")
	setStr(&cfg.Address, "address")
	if c.IsSet("join") {
		cfg.Join = c.StringSlice("join")
	}
	setInt(&cfg.GossipPort, "gossip-port")
	setInt(&cfg.GRPCPort, "grpc-port")
	setInt(&cfg.ReplicaPort, "replica-port")
	setStr(&cfg.MetricsAddr, "metrics-addr")
	setStr(&cfg.GossipProfile, "gossip-profile")
	setStr(&cfg.StateDir, "state-dir")
	setStr(&cfg.ModelsDir, "models-dir")
	if c.IsSet("skip-local-model-check") {
		cfg.SkipLocalModelCheck = c.Bool("skip-local-model-check")
	}
	if c.IsSet("workers") {
		cfg.Download.Workers = c.Int("workers")
	}
	if c.IsSet("part-size") {
		part, err := parseSize(c.String("part-size"))
		if err != nil {
			return cfg, fmt.Errorf("--part-size: %w", err)
		}
		cfg.Download.PartSizeMiB = int(part >> 20)
	}
	if lim, err := limitRate(c); err != nil {
		return cfg, err
	} else if lim > 0 {
		cfg.Download.LimitMiBps = int(max(lim>>20, 1))
	}
	setStr(&cfg.Download.S3Endpoint, "s3-endpoint")
	setStr(&cfg.Download.HFEndpoint, "hf-endpoint")
	if ps := pathStyle(c); ps != nil {
		cfg.Download.S3PathStyle = ps
	}
	setStr(&cfg.GPUBackend, "gpu-backend")
	if c.IsSet("slurm") {
		cfg.Slurm = c.Bool("slurm")
	}
	if c.IsSet("gpus") {
		cfg.GPUs = c.IntSlice("gpus")
	}
	setStr(&cfg.RayBin, "ray-bin")
	setStr(&cfg.VLLMBin, "vllm-bin")
	setStr(&cfg.PythonBin, "python-bin")
	setStr(&cfg.EngineHost, "engine-host")
	if c.IsSet("stop-grace") {
		cfg.StopGrace = c.Duration("stop-grace")
	}
	if c.IsSet("restart-backoff") {
		cfg.RestartBackoff = c.Duration("restart-backoff")
	}
	if c.IsSet("canary-interval") {
		cfg.CanaryInterval = c.Duration("canary-interval")
	}
	if c.IsSet("hang-timeout") {
		cfg.HangTimeout = c.Duration("hang-timeout")
	}
	if c.IsSet("stop-engines-on-exit") {
		cfg.StopEnginesOnExit = c.Bool("stop-engines-on-exit")
	}
	for _, kv := range c.StringSlice("engine-env") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return cfg, fmt.Errorf("--engine-env %q: want KEY=VALUE", kv)
		}
		if cfg.EngineEnv == nil {
			cfg.EngineEnv = map[string]string{}
		}
		cfg.EngineEnv[k] = v
	}
	setStr(&cfg.Containerd.Address, "containerd-address")
	setStr(&cfg.Containerd.Namespace, "containerd-namespace")
	if v := c.String("log-max-size"); v != "" {
		n, err := bytesize.Parse(v)
		if err != nil {
			return cfg, fmt.Errorf("--log-max-size: %w", err)
		}
		cfg.LogMaxBytes = n
	}
	return cfg, nil
}
