package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/agent"
	"github.com/shoalhq/shoal/coordinator"
	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/urfave/cli/v2"
)

// slurmAgentConfig fills what an agent running as a Slurm job step takes
// from its allocation: its node id (node and job: two jobs may share a
// node), a state directory of the job's, the job's port band (every port
// not given explicitly moves by it), the step's GPUs, and the job's end.
func slurmAgentConfig(c *cli.Context, cfg *agent.Config, al slurm.Alloc, cl slurm.Client) {
	if cfg.NodeID == "" {
		cfg.NodeID = al.NodeID()
	}
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(os.TempDir(), "shoal-"+al.NodeID()) // $TMPDIR: node-local under most Slurm setups
	}
	if cfg.Address == "" && len(cfg.Join) > 0 {
		cfg.Address = routeIP(cfg.Join[0]) // the address this node reaches the cluster from
	}
	cfg.SlurmJob, cfg.SlurmNodes = al.JobID, al.NodeList
	cfg.PortBand = slurm.PortBand(al.JobID)
	off := cfg.PortBand * slurm.PortBandWidth
	for _, p := range []struct {
		v   *int
		def int
	}{{&cfg.GossipPort, 7946}, {&cfg.GRPCPort, 7947}, {&cfg.ReplicaPort, 7948}} {
		if *p.v == 0 {
			*p.v = p.def + off
		}
	}
	if len(cfg.GPUs) == 0 {
		cfg.GPUMinors, cfg.GPUUUIDs = al.Indices() // Slurm's GPU ids are device numbers, not NVML's order
	}
	if !c.IsSet("stop-engines-on-exit") {
		cfg.StopEnginesOnExit = true // the step's end kills them anyway; no later agent adopts them
	}
	id := al.JobID
	cfg.JobEnds = func(ctx context.Context) (time.Time, error) {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		j, err := cl.Job(ctx, id)
		return j.Ends, err
	}
}

// slurmSignals turns Slurm's signals into the agent's leaving: SIGUSR1
// (sbatch --signal: the time limit is near) says so in gossip; SIGTERM
// (scancel, preemption, the time limit) also drains the node's replica at
// once, then lets the agent exit after a moment for gossip to carry it.
func slurmSignals(ctx context.Context, a *agent.Agent, log *slog.Logger) (context.Context, func()) {
	// main's context ends at SIGTERM; here SIGTERM drains first.
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-ch:
				if s == syscall.SIGINT {
					cancel()
					return
				}
				if s == syscall.SIGUSR1 {
					if err := a.Leave(ctx, "Slurm signalled the job (SIGUSR1): its time limit is near", false); err != nil {
						log.Warn("leave", "err", err)
					}
					continue
				}
				if err := a.Leave(ctx, "Slurm is ending the job (SIGTERM): cancelled, preempted or out of time", true); err != nil {
					log.Warn("leave", "err", err)
				}
				select {
				case <-time.After(2 * time.Second):
				case <-ctx.Done():
				}
				cancel()
				return
			}
		}
	}()
	return ctx, func() { signal.Stop(ch); cancel(); <-done }
}

func slurmAlloc() (slurm.Alloc, error) {
	al, err := slurm.FromEnv(os.Getenv)
	if err != nil {
		return al, err
	}
	if len(al.GPUs) == 0 {
		return al, fmt.Errorf("--slurm: Slurm gave this step no GPUs; submit with --gres=gpu:N (or --gpus-per-node) and run `srun --ntasks-per-node=1 shoal agent --slurm`")
	}
	return al, nil
}

// coordinatorSlurm is the coordinator's Slurm node source, from its flags.
func coordinatorSlurm(c *cli.Context) (*coordinator.SlurmConfig, error) {
	if !c.Bool("slurm") {
		if c.IsSet("slurm-agent-command") {
			return nil, fmt.Errorf("--slurm-agent-command needs --slurm")
		}
		return nil, nil
	}
	ac := strings.TrimSpace(c.String("slurm-agent-command"))
	if ac == "" {
		return nil, fmt.Errorf("--slurm needs --slurm-agent-command: what each node of a job runs, e.g. \"shoal agent --slurm --join 10.0.0.5:7946 --insecure\"")
	}
	if strings.ContainsAny(ac, "\n\r") {
		return nil, fmt.Errorf("--slurm-agent-command: one line, please")
	}
	return &coordinator.SlurmConfig{Client: &slurm.CLI{}, AgentCommand: ac, Interval: c.Duration("slurm-interval")}, nil
}

// routeIP is the local address this host uses toward addr ("" if none):
// a node of a job learns its own address without being told.
func routeIP(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		host, port = addr, "7946"
	}
	conn, err := net.Dial("udp", net.JoinHostPort(host, port)) // no packet is sent
	if err != nil {
		return ""
	}
	defer conn.Close()
	return conn.LocalAddr().(*net.UDPAddr).IP.String()
}
