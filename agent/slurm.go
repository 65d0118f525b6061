package agent

import (
	"context"
	"time"
	"unicode/utf8"
)

// jobPoll is how often an agent in a Slurm job re-reads its job's end
// (an admin may extend it).
const jobPoll = 30 * time.Second

// watchJob keeps the job's end time in the agent's tag.
func (a *Agent) watchJob(ctx context.Context) {
	for {
		ends, err := a.cfg.JobEnds(ctx)
		if err != nil {
			a.log.Warn("cannot read the Slurm job's end time; the tag keeps the last one", "job", a.cfg.SlurmJob, "err", err)
		} else {
			_ = a.do(ctx, func() error {
				if !ends.Equal(a.jobEnds) {
					a.jobEnds = ends
					a.publish()
				}
				return nil
			})
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(jobPoll):
		}
	}
}

// Leave says in gossip that this node will soon be gone (Slurm signalled
// its job: the time limit is near, or the job is preempted or cancelled),
// so that the coordinator hands its replica over to another job. With
// drain the node's replica also takes no new request from now on (the job
// ends within Slurm's grace time).
func (a *Agent) Leave(ctx context.Context, why string, drain bool) error {
	return a.do(ctx, func() error {
		if a.leaving == "" {
			a.log.Warn("this node is leaving", "job", a.cfg.SlurmJob, "why", why)
			a.leaving = why
		}
		if as := a.loc.As; drain && as != nil {
			if _, err := a.drain(as.Group, as.Epoch); err != nil {
				return err
			}
		}
		a.publish()
		return nil
	})
}

// cut shortens s to at most n bytes, marking the cut with "…" (on a rune
// boundary).
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n - len("…")
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}
