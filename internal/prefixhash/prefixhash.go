// Package prefixhash chains a hash over fixed-size blocks of text, so two
// texts share hashes exactly as far as they are identical from the start.
// The simulator's prefix cache and the router's prefix-aware strategies both
// use it (each with its own block size).
package prefixhash

import (
	"encoding/binary"
	"hash/fnv"
)

// Chain hashes each full block of block bytes of text[:limit] (limit ≤ 0: all),
// each hash covering every block before it. Hashes are never 0.
func Chain(text string, block, limit int) []uint64 {
	if limit > 0 && len(text) > limit {
		text = text[:limit]
	}
	var out []uint64
	var prev uint64
	var buf [8]byte
	for i := 0; i+block <= len(text); i += block {
		h := fnv.New64a()
		binary.LittleEndian.PutUint64(buf[:], prev)
		_, _ = h.Write(buf[:])
		_, _ = h.Write([]byte(text[i : i+block]))
		prev = h.Sum64() | 1
		out = append(out, prev)
	}
	return out
}
