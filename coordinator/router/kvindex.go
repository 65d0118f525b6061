package router

import (
	"sync"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/shoalhq/shoal/internal/kvhash"
)

// KVIndex is which replica holds which KV-cache block, as the engines
// themselves report it: each replica's head relays its engine's KV events
// (docs/design/kv-events.md) and the index applies them — a snapshot when a
// stream starts, then every store, eviction and clear. Any number of routers
// fed by the same heads hold the same index, because none of it is guessed
// from a router's own history.
//
// It is kept as one set of block names per replica: a prompt's match on a
// replica is the run of its leading blocks in that replica's set, and
// forgetting a replica (its stream ends, its engine restarts) drops one map.
// The total is bounded by max blocks: a store beyond it is not indexed and
// counted (a block missing from the index only costs a cache hit the router
// does not see; it never sends a request where the block is not).
type KVIndex struct {
	max int

	mu      sync.RWMutex
	reps    map[string]*kvReplica // guarded by mu; engine address → its blocks
	total   int                   // guarded by mu; blocks indexed, all replicas
	dropped uint64                // guarded by mu; stores not indexed (over max)

	obsMu    sync.Mutex
	onStored []func(addr string, blocks []uint64) // guarded by obsMu
}

type kvReplica struct {
	hasher *kvhash.Namer
	blocks map[uint64]struct{}
	seq    uint64 // the last sequence number applied
}

// KVBytesPerBlock is what one indexed block costs in memory at most: an
// 8-byte key in a Go map, whose slots take 16 bytes and are between 7/16 and
// 7/8 full (TestKVIndexMemory measures 32, presized or grown).
const KVBytesPerBlock = 40

// DefaultKVIndexBlocks bounds the index: 8M blocks (≤ 320 MB), 128M tokens
// of KV at vLLM's default 16-token blocks — the caches of some 100 8-GPU
// H100 nodes serving a 70B model (83k blocks each).
const DefaultKVIndexBlocks = 8 << 20

// NewKVIndex returns an empty index holding at most max blocks (≤ 0: the default).
func NewKVIndex(max int) *KVIndex {
	if max <= 0 {
		max = DefaultKVIndexBlocks
	}
	return &KVIndex{max: max, reps: map[string]*kvReplica{}}
}

// SetMax changes the bound (n ≤ 0: no change). Blocks already held stay;
// new stores are refused until the total is under it.
func (x *KVIndex) SetMax(n int) {
	if n <= 0 {
		return
	}
	x.mu.Lock()
	x.max = n
	x.mu.Unlock()
}

// Reset starts a replica afresh from a snapshot: the hasher its engine names
// blocks with, the blocks it holds, and the sequence number they are as of.
func (x *KVIndex) Reset(addr string, h *kvhash.Namer, blocks []uint64, seq uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.dropLocked(addr)
	r := &kvReplica{hasher: h, blocks: make(map[uint64]struct{}, len(blocks)), seq: seq}
	x.reps[addr] = r
	for _, b := range blocks {
		x.addLocked(r, b)
	}
}

// OnStored has f called with the blocks of every batch in which an engine
// reported blocks stored, after the batch is applied (outside the index's
// lock; indexed or not, over the bound). The router's picker learns from it
// that a prompt's prefill is done (strategy.go).
func (x *KVIndex) OnStored(f func(addr string, blocks []uint64)) {
	x.obsMu.Lock()
	x.onStored = append(x.onStored, f)
	x.obsMu.Unlock()
}

// Apply applies one batch of events numbered seq to a replica that has had
// its snapshot. It reports false when the replica has none (the caller must
// resynchronise) or seq does not follow the last one applied.
func (x *KVIndex) Apply(addr string, seq uint64, evs []kvevents.Event) bool {
	stored, ok := x.apply(addr, seq, evs)
	if len(stored) > 0 {
		x.obsMu.Lock()
		fs := x.onStored
		x.obsMu.Unlock()
		for _, f := range fs {
			f(addr, stored)
		}
	}
	return ok
}

func (x *KVIndex) apply(addr string, seq uint64, evs []kvevents.Event) (stored []uint64, ok bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	r, ok := x.reps[addr]
	if !ok || seq != r.seq+1 {
		return nil, false
	}
	r.seq = seq
	for _, e := range evs {
		switch e.Kind {
		case kvevents.Stored:
			for _, h := range e.Hashes {
				x.addLocked(r, h)
			}
			stored = append(stored, e.Hashes...)
		case kvevents.Removed:
			for _, h := range e.Hashes {
				if _, ok := r.blocks[h]; ok {
					delete(r.blocks, h)
					x.total--
				}
			}
		case kvevents.Cleared:
			x.total -= len(r.blocks)
			r.blocks = map[uint64]struct{}{}
		}
	}
	return stored, true
}

// Drop forgets a replica: its stream ended, so its blocks are no longer
// known (routing falls back to the router's own estimate for it).
func (x *KVIndex) Drop(addr string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.dropLocked(addr)
}

func (x *KVIndex) dropLocked(addr string) {
	if r, ok := x.reps[addr]; ok {
		x.total -= len(r.blocks)
		delete(x.reps, addr)
	}
}

func (x *KVIndex) addLocked(r *kvReplica, h uint64) {
	if _, ok := r.blocks[h]; ok {
		return
	}
	if x.total >= x.max {
		x.dropped++
		return
	}
	r.blocks[h] = struct{}{}
	x.total++
}

// Hasher returns how a replica names blocks, when it sends events.
func (x *KVIndex) Hasher(addr string) (*kvhash.Namer, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	r, ok := x.reps[addr]
	if !ok {
		return nil, false
	}
	return r.hasher, true
}

// Match is how many of keys, from the first, the replica holds; ok is false
// when the replica sends no events.
func (x *KVIndex) Match(addr string, keys []uint64) (n int, ok bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	r, ok := x.reps[addr]
	if !ok {
		return 0, false
	}
	for _, k := range keys {
		if _, hit := r.blocks[k]; !hit {
			break
		}
		n++
	}
	return n, true
}

// KVIndexStats is the index's size, for metrics and status.
type KVIndexStats struct {
	Replicas int    // replicas sending events
	Blocks   int    // blocks indexed
	Bytes    int    // their memory, at KVBytesPerBlock
	Max      int    // the bound on Blocks
	Dropped  uint64 // stores not indexed because the bound was reached
}

// Stats reports the index's size.
func (x *KVIndex) Stats() KVIndexStats {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return KVIndexStats{Replicas: len(x.reps), Blocks: x.total, Bytes: x.total * KVBytesPerBlock, Max: x.max, Dropped: x.dropped}
}
