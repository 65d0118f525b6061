package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/shoalhq/shoal/coordinator/plan"
	"github.com/shoalhq/shoal/coordinator/slurmsrc"
	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/shoalhq/shoal/spec"
)

// SlurmConfig lets Slurm-sourced deployments get their nodes from Slurm
// (docs/design/slurm.md).
type SlurmConfig struct {
	Client slurm.Client
	// AgentCommand is what each node of a job runs, one task per node:
	// `shoal agent --slurm --join …` with the agent's flags. The batch
	// script is `srun --ntasks-per-node=1 --kill-on-bad-exit=1` + it.
	AgentCommand string
	// Interval is how often Slurm's queue is read (default 3s); Timeout
	// bounds each command (default 30s: a busy slurmctld is slow).
	Interval, Timeout time.Duration
}

// slurmView is the Slurm node source's last decision, read by the
// reconciler and the API.
type slurmView struct {
	plan *slurmsrc.Plan
}

// jobPrefix starts the name of every job this cluster submits.
func (c *Coordinator) jobPrefix() string { return "shoal." + c.cfg.Cluster + "." }

// BatchScript is the batch script of a job of deployment dep.
func BatchScript(agentCommand, dep string) string {
	return "#!/bin/bash\n" +
		"# shoal: one agent per node of this job; the coordinator places a replica of " + dep + " on them.\n" +
		"# srun passes Slurm's signals on to the agents: SIGUSR1 (--signal) hands the replica over, SIGTERM drains it.\n" +
		"exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 " + agentCommand + "\n"
}

// slurmLoop reads Slurm's queue, decides (slurmsrc.Decide) and submits or
// cancels jobs. Only the leader acts; a follower keeps the view (its API
// answers reads from it: PENDING jobs in `get replicas`).
func (c *Coordinator) slurmLoop(ctx context.Context) {
	sc := c.cfg.Slurm
	t := time.NewTicker(sc.Interval)
	defer t.Stop()
	for {
		c.slurmPass(ctx, c.leading())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (c *Coordinator) slurmPass(ctx context.Context, act bool) {
	sc := c.cfg.Slurm
	recs, err := c.deployments()
	if err != nil {
		c.log.Error("slurm: read the deployments", "err", err)
		return
	}
	groups, err := c.store.Groups()
	if err != nil {
		c.log.Error("slurm: read the groups", "err", err)
		return
	}
	s := slurmsrc.Snapshot{Now: c.now(), Prefix: c.jobPrefix(), Groups: groups, Nodes: c.agents(),
		Script: func(d slurmsrc.Deployment) string { return BatchScript(sc.AgentCommand, d.Name) }}
	for _, r := range recs {
		if r.Spec.Slurm != nil {
			s.Deployments = append(s.Deployments, slurmsrc.Deployment{Name: r.Name, Spec: r.Spec, Desired: c.desiredReplicas(r.Spec)})
		}
	}
	qctx, cancel := context.WithTimeout(ctx, sc.Timeout)
	s.Jobs, s.QueueErr = sc.Client.Jobs(qctx, s.Prefix)
	cancel()
	if ctx.Err() != nil {
		return
	}
	p := slurmsrc.Decide(s)
	c.log.Debug("slurm pass", "jobs", len(s.Jobs), "err", s.QueueErr, "submit", len(p.Submit), "cancel", len(p.Cancel), "leader", act)
	for _, e := range p.Events {
		c.events.add(e.Deployment, e.Key, "%s", e.Msg)
	}
	if !act {
		p.Submit, p.Cancel = nil, nil
	}
	for _, sub := range p.Submit {
		sctx, cancel := context.WithTimeout(ctx, sc.Timeout)
		id, err := sc.Client.Submit(sctx, sub.Request)
		cancel()
		if err != nil {
			msg := fmt.Sprintf("cannot submit a Slurm job for a replica: %v", err)
			p.Short[sub.Deployment] = msg
			c.events.add(sub.Deployment, "submit/"+sub.Deployment, "%s", msg)
			c.log.Warn("sbatch", "deployment", sub.Deployment, "err", err)
			break // the next pass tries again
		}
		c.events.add(sub.Deployment, "", "submitted Slurm job %s (%d node(s), --gres=%s, --time=%d): %s", id, sub.Request.Nodes, sub.Request.GRES,
			slurm.Minutes(sub.Request.Time), sub.Why)
		c.log.Info("submitted Slurm job", "deployment", sub.Deployment, "job", id)
	}
	for _, cn := range p.Cancel {
		cctx, cancel := context.WithTimeout(ctx, sc.Timeout)
		err := sc.Client.Cancel(cctx, cn.Job)
		cancel()
		if err != nil {
			c.events.add(cn.Deployment, "cancel/"+cn.Job, "cannot cancel Slurm job %s (%s): %v", cn.Job, cn.Why, err)
			continue
		}
		c.events.add(cn.Deployment, "", "cancelled Slurm job %s: %s", cn.Job, cn.Why)
	}
	c.mu.Lock()
	c.slurm = &slurmView{plan: p}
	c.mu.Unlock()
	c.poke() // the reconciler reads the new view now, not at its next tick
}

// withSlurm adds the Slurm node source's last decision to a reconcile
// snapshot: reserved nodes, handovers, replicas whose job ended.
func (c *Coordinator) withSlurm(s *plan.Snapshot) {
	c.mu.Lock()
	v := c.slurm
	c.mu.Unlock()
	if v == nil {
		return
	}
	s.Reserved, s.Expiring, s.Ended = v.plan.Reserved, v.plan.Expiring, v.plan.Ended
}

// slurmJobs are the live jobs of the deployments in want ("": all), by
// deployment, as last read.
func (c *Coordinator) slurmJobs(want map[string]bool) map[string][]slurm.Job {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string][]slurm.Job{}
	if c.slurm == nil {
		return out
	}
	for dep, jobs := range c.slurm.plan.Jobs {
		if want[dep] || want[""] {
			out[dep] = jobs
		}
	}
	return out
}

// checkSlurm asks Slurm whether it would take d's jobs (sbatch
// --test-only): a partition, account or QoS that does not exist, GRES the
// partition lacks or a time limit above its own are refused at apply time,
// in Slurm's words. A Slurm that cannot be asked is a warning: the
// deployment is stored, and its jobs wait for slurmctld.
func (c *Coordinator) checkSlurm(ctx context.Context, d *spec.Deployment) (string, error) {
	var deps []*spec.Deployment
	if d.Roles != nil {
		deps = []*spec.Deployment{d.RoleDeployment(spec.RolePrefill), d.RoleDeployment(spec.RoleDecode)}
	} else if d.Slurm != nil {
		deps = []*spec.Deployment{d}
	}
	for _, rd := range deps {
		if rd.Slurm == nil {
			continue
		}
		sc := c.cfg.Slurm
		if sc == nil {
			return "", fmt.Errorf("%w: slurm: this coordinator has no Slurm: start it with --slurm (and --slurm-agent-command) on a host where sbatch, squeue and scancel reach slurmctld",
				spec.ErrInvalid)
		}
		sd := slurmsrc.Deployment{Name: rd.Name, Spec: rd, Desired: 1}
		tctx, cancel := context.WithTimeout(ctx, sc.Timeout)
		err := sc.Client.Test(tctx, slurmsrc.Request(c.jobPrefix(), sd, BatchScript(sc.AgentCommand, rd.Name)))
		cancel()
		var ref *slurm.Refused
		switch {
		case errors.As(err, &ref):
			return "", fmt.Errorf("%w: slurm: %s", spec.ErrInvalid, strings.TrimPrefix(ref.Error(), "slurm "))
		case err != nil:
			return fmt.Sprintf("could not check the job with Slurm (%v); stored anyway: its jobs are submitted once slurmctld answers", err), nil
		}
	}
	return "", nil
}
