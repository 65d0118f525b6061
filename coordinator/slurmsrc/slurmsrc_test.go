package slurmsrc

import (
	"errors"
	"testing"
	"time"

	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

var t0 = time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)

func dep(desired int) Deployment {
	d := &spec.Deployment{Name: "m", Resources: spec.Resources{Nodes: 2, GPUsPerNode: 8},
		Slurm: &spec.Slurm{Partition: "gpu", TimeLimitMinutes: 240, HandoverLeadSeconds: 600, QueueWaitWarningSeconds: 1800, GRES: "gpu:8"}}
	return Deployment{Name: "m", Spec: d, Desired: desired}
}

func job(id, state string, ends time.Time) slurm.Job {
	return slurm.Job{ID: id, Name: "shoal.c.m", State: state, Reason: "None", Submitted: t0.Add(-time.Hour), Ends: ends}
}

func node(id, job string) gossip.Tag {
	return gossip.Tag{Kind: gossip.KindAgent, ID: id, SlurmJob: job, Healthy: true}
}

func snap(d Deployment, jobs []slurm.Job, groups []*store.Group, nodes ...gossip.Tag) Snapshot {
	s := Snapshot{Now: t0, Prefix: "shoal.c.", Deployments: []Deployment{d}, Jobs: jobs, Groups: groups, Nodes: map[string]gossip.Tag{},
		Script: func(Deployment) string { return "#!/bin/bash\n" }}
	for _, n := range nodes {
		s.Nodes[n.ID] = n
	}
	return s
}

func group(id, job string) *store.Group {
	return &store.Group{ID: id, Deployment: "m", Epoch: 1, SlurmJob: job}
}

func cancels(p *Plan) []string {
	var out []string
	for _, c := range p.Cancel {
		out = append(out, c.Job+": "+c.Why)
	}
	return out
}

func TestDecide(t *testing.T) {
	later := t0.Add(3 * time.Hour)
	soon := t0.Add(5 * time.Minute)
	for _, tc := range []struct {
		name     string
		s        Snapshot
		submit   int
		cancel   []string
		expiring map[string]string
		ended    map[string]string
		reserved map[string]string
	}{
		{name: "no job: one is submitted per wanted replica", s: snap(dep(2), nil, nil), submit: 2},
		{name: "a pending job covers its replica", s: snap(dep(1), []slurm.Job{job("10", slurm.StatePending, time.Time{})}, nil)},
		{name: "a running job's nodes are its deployment's", s: snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, later)}, []*store.Group{group("g1", "10")},
			node("a", "10"), node("b", "10"), node("c", "")), reserved: map[string]string{"a": "m", "b": "m"}},
		{name: "a job within the lead of its end is handed over: a replacement is submitted",
			s:        snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, soon)}, []*store.Group{group("g1", "10")}, node("a", "10")),
			submit:   1,
			expiring: map[string]string{"g1": "job 10 ends at 12:05:00 UTC"}, reserved: map[string]string{"a": "m"}},
		{name: "a signalled node hands its job over at once",
			s: snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, later)}, []*store.Group{group("g1", "10")},
				gossip.Tag{Kind: gossip.KindAgent, ID: "a", SlurmJob: "10", Leaving: true}),
			submit: 1, expiring: map[string]string{"g1": "Slurm signalled job 10 (node a is leaving)"}, reserved: map[string]string{"a": "m"}},
		{name: "the replacement is running: nothing more is submitted",
			s: snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, soon), job("11", slurm.StateRunning, later)},
				[]*store.Group{group("g1", "10"), group("g2", "11")}, node("a", "10"), node("b", "11")),
			expiring: map[string]string{"g1": "job 10 ends at 12:05:00 UTC"}, reserved: map[string]string{"a": "m", "b": "m"}},
		{name: "a handed-over job whose replica was released is cancelled",
			s: snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, soon), job("11", slurm.StateRunning, later)},
				[]*store.Group{group("g2", "11")}),
			cancel: []string{"10: handed over (job 10 ends at 12:05:00 UTC)"}},
		{name: "scale-in: a pending job goes first, newest first",
			s: snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, later), job("11", slurm.StatePending, time.Time{}), job("12", slurm.StatePending, time.Time{})},
				[]*store.Group{group("g1", "10")}),
			cancel: []string{"12: scaled in to 1 replica(s)", "11: scaled in to 1 replica(s)"}},
		{name: "scale-in: a job whose replica still serves waits for its drain",
			s: snap(dep(0), []slurm.Job{job("10", slurm.StateRunning, later)}, []*store.Group{group("g1", "10")})},
		{name: "scale-in: a job no replica runs on is cancelled",
			s:      snap(dep(0), []slurm.Job{job("10", slurm.StateRunning, later)}, nil),
			cancel: []string{"10: scaled in to 0 replica(s)"}},
		{name: "a draining replica's job does not count; it is cancelled once released",
			s: snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, later)},
				[]*store.Group{{ID: "g1", Deployment: "m", SlurmJob: "10", DrainingSince: t0}}),
			submit: 1},
		{name: "a replica whose job is gone from the queue ended with it",
			s:     snap(dep(1), nil, []*store.Group{group("g1", "10")}),
			ended: map[string]string{"g1": "its Slurm job 10 ended"}, submit: 1},
		{name: "a job of a deleted deployment is cancelled",
			s:      snap(dep(0), []slurm.Job{{ID: "20", Name: "shoal.c.gone", State: slurm.StateRunning}}, nil),
			cancel: []string{"20: its deployment is gone (or no longer takes its nodes from Slurm)"}},
		{name: "a completing job neither covers nor is cancelled",
			s: snap(dep(1), []slurm.Job{job("10", slurm.StateCompleting, later)}, nil), submit: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := Decide(tc.s)
			require.Len(t, p.Submit, tc.submit)
			require.Equal(t, tc.cancel, cancels(p))
			require.Equal(t, orEmpty(tc.expiring), p.Expiring)
			require.Equal(t, orEmpty(tc.ended), p.Ended)
			require.Equal(t, orEmpty(tc.reserved), p.Reserved)
		})
	}
}

func orEmpty(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

func TestDecideRequest(t *testing.T) {
	p := Decide(snap(dep(1), nil, nil))
	require.Len(t, p.Submit, 1)
	r := p.Submit[0].Request
	require.Equal(t, slurm.Request{Name: "shoal.c.m", Partition: "gpu", Nodes: 2, GRES: "gpu:8", Time: 4 * time.Hour, Signal: 10 * time.Minute,
		Comment: "shoal deployment m", Script: "#!/bin/bash\n"}, r)
}

func TestDecideQueueWait(t *testing.T) {
	j := job("10", slurm.StatePending, time.Time{})
	j.Reason = "Priority"
	j.Submitted = t0.Add(-31 * time.Minute)
	p := Decide(snap(dep(1), []slurm.Job{j}, nil))
	require.Empty(t, p.Submit)
	require.Len(t, p.Events, 1)
	require.Contains(t, p.Events[0].Msg, "Slurm job 10 has been pending for 31m0s (reason: Priority)")
}

func TestDecideSlurmDown(t *testing.T) {
	s := snap(dep(2), nil, []*store.Group{group("g1", "10")}, gossip.Tag{Kind: gossip.KindAgent, ID: "a", SlurmJob: "10", Leaving: true})
	s.QueueErr = errors.New("slurm: cannot reach slurmctld: Unable to contact slurm controller")
	p := Decide(s)
	require.Empty(t, p.Submit, "nothing is submitted while Slurm cannot be asked")
	require.Empty(t, p.Cancel)
	require.Empty(t, p.Ended, "a job not listed is not taken for ended")
	require.Equal(t, map[string]string{"a": "m"}, p.Reserved, "the stored groups still say whose nodes are whose")
	require.Contains(t, p.Expiring, "g1", "a leaving node is still handed over")
	require.Contains(t, p.Short["m"], "cannot scale: slurm: cannot reach slurmctld")
}

// A handover's reason is the same from pass to pass (no countdown), so
// that its event is shown once.
func TestExpiringReasonIsStable(t *testing.T) {
	s := snap(dep(1), []slurm.Job{job("10", slurm.StateRunning, t0.Add(5*time.Minute))}, []*store.Group{group("g1", "10")})
	first := Decide(s).Expiring["g1"]
	s.Now = s.Now.Add(3 * time.Second)
	require.Equal(t, first, Decide(s).Expiring["g1"])
	require.NotEmpty(t, first)
}
