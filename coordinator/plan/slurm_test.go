package plan

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
)

func slurmDemo(replicas int) Deployment {
	d := demo(replicas)
	d.Spec.Slurm = &spec.Slurm{TimeLimitMinutes: 60}
	return d
}

func ofJob(job string) func(*gossip.Tag) { return func(t *gossip.Tag) { t.SlurmJob = job } }

func reserved(r map[string]string) func(*Snapshot) { return func(s *Snapshot) { s.Reserved = r } }

// A Slurm-sourced deployment is placed on one job's nodes only; other
// deployments never take a job's reserved nodes; a group never mixes port
// bands.
func TestSlurmPlacement(t *testing.T) {
	ns := nodes(agent("a", ofJob("10")), agent("b", ofJob("11")), agent("c", ofJob("11")), agent("d"), agent("e"))
	res := map[string]string{"a": "demo", "b": "demo", "c": "demo"}
	p := Compute(snap([]Deployment{slurmDemo(1)}, nil, ns, reserved(res)))
	require.Len(t, p.Put, 1)
	g := p.Put[0]
	require.Equal(t, "11", g.SlurmJob, "job 10 has one node, the replica needs two")
	require.Equal(t, []string{"b", "c"}, []string{g.Members[0].NodeID, g.Members[1].NodeID})

	other := demo(2)
	other.Name, other.Spec.Name = "other", "other"
	p = Compute(snap([]Deployment{other}, nil, ns, reserved(res)))
	require.Len(t, p.Put, 1, "only d and e are free for a deployment not sourced from Slurm")
	require.Equal(t, "d", p.Put[0].Members[0].NodeID)
	require.Contains(t, p.Short["other"], "cannot place a replica")

	banded := nodes(agent("a", func(t *gossip.Tag) { t.PortBand = 3 }), agent("b", func(t *gossip.Tag) { t.PortBand = 4 }))
	p = Compute(snap([]Deployment{demo(1)}, nil, banded))
	require.Empty(t, p.Put, "two agents of different jobs' port bands cannot form one group")

	p = Compute(snap([]Deployment{slurmDemo(1)}, nil, nodes(agent("d"), agent("e"))))
	require.Empty(t, p.Put)
	require.Contains(t, p.Short["demo"], "waiting for a Slurm job's 2 node(s)")
}

// A handover: the expiring replica is replaced by one on the new job's
// nodes first, drained only once that serves, and never drained while no
// replacement can be placed.
func TestSlurmHandover(t *testing.T) {
	old := grp("demo-old", 1, 0, "a", "b")
	old.SlurmJob = "10"
	exp := func(s *Snapshot) { s.Expiring = map[string]string{old.ID: "job 10 ends at 12:05:00 UTC"} }
	ns := nodes(agent("a", ofJob("10"), in(old, gossip.EngineReady, true)), agent("b", ofJob("10"), in(old, gossip.EngineRunning, false)))
	res := map[string]string{"a": "demo", "b": "demo"}

	p := Compute(snap([]Deployment{slurmDemo(1)}, []*store.Group{old}, ns, reserved(res), exp, serving(old, "a")))
	require.Empty(t, p.Put, "no replacement job's nodes yet: nothing is drained")
	require.Contains(t, events(p), "waiting for a replacement job's nodes to hand 1 replica(s) over")

	ns["c"], ns["d"] = agent("c", ofJob("11")), agent("d", ofJob("11"))
	res["c"], res["d"] = "demo", "demo"
	p = Compute(snap([]Deployment{slurmDemo(1)}, []*store.Group{old}, ns, reserved(res), exp, serving(old, "a")))
	require.Len(t, p.Put, 1)
	nw := p.Put[0]
	require.Equal(t, "11", nw.SlurmJob)
	require.True(t, p.Put[0].DrainingSince.IsZero())

	p = Compute(snap([]Deployment{slurmDemo(1)}, []*store.Group{old, nw}, ns, reserved(res), exp, serving(old, "a"), serving(nw, "c")))
	require.Len(t, p.Put, 1)
	require.Equal(t, old.ID, p.Put[0].ID)
	require.Equal(t, "handed over: job 10 ends at 12:05:00 UTC", p.Put[0].DrainWhy)
}

// A replica whose Slurm job ended is deleted, and a new one is placed when
// a job's nodes join.
func TestSlurmJobEnded(t *testing.T) {
	g := grp("demo-1", 1, 0, "a", "b")
	g.SlurmJob = "10"
	p := Compute(snap([]Deployment{slurmDemo(1)}, []*store.Group{g}, nodes(), func(s *Snapshot) {
		s.Ended = map[string]string{g.ID: "its Slurm job 10 ended"}
	}))
	require.Len(t, p.Delete, 1)
	require.Equal(t, "its Slurm job 10 ended", p.Delete[0].Why)
	require.Contains(t, events(p), "released replica demo-1: its Slurm job 10 ended")
}
