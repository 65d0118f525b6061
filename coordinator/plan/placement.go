package plan

import (
	"fmt"
	"sort"

	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
)

// Fits reports whether a node can hold one member of a replica with res.
func Fits(t gossip.Tag, res spec.Resources) bool {
	return t.Kind == gossip.KindAgent && t.Healthy && t.GPUs >= res.GPUsPerNode &&
		(res.GPUModel == "" || res.GPUModel == t.GPUModel) &&
		(!res.RDMA || t.RDMA != "") && t.GPUMemGiB >= res.MinGPUMemoryGiB
}

// Idle reports whether a node is free to be placed: in no stored group and
// running nothing (its tag shows no group and no engine still stopping, so
// its GPUs are released).
func Idle(t gossip.Tag, used map[string]bool) bool {
	return !used[t.ID] && t.Group == "" && !t.Stopping
}

// Place picks n idle nodes that fit res, or nil when there are not enough.
// The choice is deterministic: nodes with the fewest spare GPUs first (keep
// big nodes for big replicas), then by id.
func Place(nodes map[string]gossip.Tag, used map[string]bool, res spec.Resources, n int) []gossip.Tag {
	var c []gossip.Tag
	for _, t := range nodes {
		if Fits(t, res) && Idle(t, used) {
			c = append(c, t)
		}
	}
	if len(c) < n {
		return nil
	}
	sort.Slice(c, func(i, j int) bool {
		if c[i].GPUs != c[j].GPUs {
			return c[i].GPUs < c[j].GPUs
		}
		return c[i].ID < c[j].ID
	})
	return c[:n]
}

// reservedFor is what Snapshot.Reserved says of the nodes d may use: its
// own name for a Slurm-sourced deployment, "" (no job's) for the others.
func reservedFor(d Deployment) string {
	if d.Spec.Slurm != nil {
		return d.Name
	}
	return ""
}

// place picks n nodes for d from one pool: a Slurm-sourced deployment's
// group takes the nodes of one of its jobs (job, when given), any other
// group nodes of no such job that share one port band (agents in a job
// of their own move their ports by the job's band; a group's members must
// agree on its engines' ports).
func (pl *planner) place(d Deployment, n int, job string) []gossip.Tag {
	want := reservedFor(d)
	pools := map[string]map[string]gossip.Tag{}
	for id, t := range pl.s.Nodes {
		if pl.s.Reserved[id] != want || (job != "" && t.SlurmJob != job) {
			continue
		}
		key := fmt.Sprintf("band %d", t.PortBand)
		if want != "" {
			key = "job " + t.SlurmJob
		}
		if pools[key] == nil {
			pools[key] = map[string]gossip.Tag{}
		}
		pools[key][id] = t
	}
	keys := make([]string, 0, len(pools))
	for k := range pools {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if picked := Place(pools[k], pl.used, d.Spec.Resources, n); picked != nil {
			return picked
		}
	}
	return nil
}
