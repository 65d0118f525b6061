package sim

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestBlocksPrefixAndLRU(t *testing.T) {
	b := newBlocks(4)
	e := newEngine(Params{BlockSize: 16, NumGPUBlocks: 4}, Clock{}, nil)
	name := func(text string) []uint64 { _, h := e.name(text); return h }
	a := name(strings.Repeat("x", 64*2))
	require.Len(t, a, 2)
	ids := []int{b.alloc(), b.alloc()}
	for i, id := range ids {
		b.register(id, a[i])
	}
	require.Equal(t, 0.5, b.usage())
	for _, id := range ids {
		b.release(id)
	}
	require.Zero(t, b.usage(), "cached blocks with no reference count as free")
	require.Equal(t, 4, b.available())
	// Same prefix, different continuation: the first block is shared.
	other := name(strings.Repeat("x", 64) + strings.Repeat("y", 64))
	require.Equal(t, a[0], other[0])
	require.NotEqual(t, a[1], other[1], "the chain makes block 2 depend on block 1 and its own text")
	hit := b.lookup(other)
	require.Equal(t, []int{ids[0]}, hit)
	b.acquire(hit[0])
	require.Equal(t, 0.25, b.usage())
	// Allocating 3 fresh blocks uses the 2 uncached ones, then evicts the LRU cached one (a[1]).
	b.alloc()
	b.alloc()
	b.alloc()
	require.Zero(t, b.available())
	require.Len(t, b.lookup(a), 1, "a[1] was evicted, a[0] is in use and kept")
}
