package plan

import (
	"testing"

	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

func node(id string, gpus int, mod func(*gossip.Tag)) gossip.Tag {
	t := gossip.Tag{Kind: gossip.KindAgent, ID: id, GPUs: gpus, GPUModel: "H200", Healthy: true, GPUMemGiB: 141}
	if mod != nil {
		mod(&t)
	}
	return t
}

func TestPlace(t *testing.T) {
	res := spec.Resources{Nodes: 2, GPUsPerNode: 8, GPUModel: "H200"}
	nodes := map[string]gossip.Tag{
		"a": node("a", 8, nil),
		"b": node("b", 8, func(t *gossip.Tag) { t.Healthy = false }),
		"c": node("c", 4, nil),
		"d": node("d", 8, func(t *gossip.Tag) { t.GPUModel = "A100" }),
		"e": node("e", 8, func(t *gossip.Tag) { t.Group = "old" }),
		"f": node("f", 8, nil),
		"g": node("g", 16, nil),
		"h": node("h", 8, nil),
		"x": node("x", 8, func(t *gossip.Tag) { t.Kind = gossip.KindCoordinator }),
	}
	got := Place(nodes, map[string]bool{"h": true}, res, 2)
	require.Len(t, got, 2)
	require.Equal(t, "a", got[0].ID)
	require.Equal(t, "f", got[1].ID)
	require.Nil(t, Place(nodes, map[string]bool{"h": true}, res, 4), "only a, f, g fit")
	res.GPUModel = ""
	require.Len(t, Place(nodes, nil, res, 5), 5, "any model: a, d, f, g, h")
	res.RDMA = true
	require.Nil(t, Place(nodes, nil, res, 1), "no node has RDMA")
	nodes["a"] = node("a", 8, func(t *gossip.Tag) { t.RDMA = "8×400G IB" })
	require.Equal(t, "a", Place(nodes, nil, res, 1)[0].ID)
	res.RDMA, res.MinGPUMemoryGiB = false, 192
	require.Nil(t, Place(nodes, nil, res, 1), "H200 has 141 GiB")
}
