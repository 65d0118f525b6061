package prefixhash

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestChain(t *testing.T) {
	a := Chain(strings.Repeat("a", 40)+strings.Repeat("b", 40), 20, 0)
	b := Chain(strings.Repeat("a", 40)+strings.Repeat("c", 40), 20, 0)
	require.Len(t, a, 4)
	require.Equal(t, a[:2], b[:2], "shared prefix, shared hashes")
	require.NotEqual(t, a[2], b[2])
	require.Len(t, Chain(strings.Repeat("a", 100), 20, 50), 2, "limit")
	require.Empty(t, Chain("short", 20, 0), "no full block")
	c := Chain(strings.Repeat("b", 20)+strings.Repeat("a", 20), 20, 0)
	require.NotEqual(t, a[1], c[1], "a block's hash depends on the blocks before it")
	for _, h := range a {
		require.NotZero(t, h)
	}
}
