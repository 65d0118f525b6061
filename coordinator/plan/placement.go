package plan

import (
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
