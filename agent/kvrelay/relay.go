// Package kvrelay is the head's copy of its engine's KV cache: which blocks
// the engine holds, kept from the engine's own KV events (read by a
// kvevents.Subscriber), and handed to any number of routers as a snapshot
// followed by every change, numbered. It has no goroutine of its own: the
// subscriber calls it, and each router stream reads from it.
package kvrelay

import (
	"sync"

	"github.com/shoalhq/shoal/internal/kvevents"
)

// Info is how the engine names its blocks, for routers to name a prompt's.
type Info struct {
	Algo      string // kvhash.AlgoSHA256CBOR
	Seed      string // PYTHONHASHSEED
	BlockSize int    // tokens per block; 0 until known
	Endpoint  string // the engine's OpenAI host:port
}

// Snapshot is the cache as of Seq.
type Snapshot struct {
	Seq    uint64
	Info   Info
	Blocks []uint64
}

// Change is one numbered step after a snapshot: either events, or a whole
// new snapshot (Reset) when what came before can no longer be trusted.
type Change struct {
	Seq    uint64
	Events []kvevents.Event
	Reset  *Snapshot
}

// Defaults: the blocks held at most (an 8-GPU node's cache is some 100k
// blocks; a bigger count is a bug or an attack) and the changes a slow
// router may fall behind by before its stream is ended.
const (
	DefaultMaxBlocks = 4 << 20
	subscriberBuffer = 4096
)

// Relay holds one engine's blocks. Its methods are safe for concurrent use.
type Relay struct {
	max int

	mu     sync.Mutex
	info   Info                // guarded by mu
	blocks map[uint64]struct{} // guarded by mu
	seq    uint64              // guarded by mu; the last change's number
	subs   map[*sub]struct{}   // guarded by mu
	closed bool                // guarded by mu
	stats  Stats               // guarded by mu
}

// Stats count what the relay has seen.
type Stats struct {
	Batches   uint64 // event batches applied
	Lost      uint64 // gaps no replay could fill, and engine restarts
	Bad       uint64 // messages that could not be read
	Overruns  uint64 // router streams ended for falling behind
	OverLimit uint64 // stores not kept (over the block limit)
}

type sub struct {
	ch      chan Change
	overrun bool
}

// New returns an empty relay for an engine named by info (BlockSize 0: learnt
// from the first BlockStored), holding at most maxBlocks (≤ 0: the default).
func New(info Info, maxBlocks int) *Relay {
	if maxBlocks <= 0 {
		maxBlocks = DefaultMaxBlocks
	}
	return &Relay{max: maxBlocks, info: info, blocks: map[uint64]struct{}{}, subs: map[*sub]struct{}{}}
}

// Batch applies one batch of the engine's events (kvevents.Handler).
func (r *Relay) Batch(_ uint64, b kvevents.Batch) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.stats.Batches++
	reset := false
	for _, e := range b.Events {
		switch e.Kind {
		case kvevents.Stored:
			if e.BlockSize > 0 && e.BlockSize != r.info.BlockSize {
				// The engine's block size, now known (or not what its
				// flags said): routers must hash with it.
				r.info.BlockSize, reset = e.BlockSize, true
			}
			for _, h := range e.Hashes {
				if _, ok := r.blocks[h]; !ok {
					if len(r.blocks) >= r.max {
						r.stats.OverLimit++
						continue
					}
					r.blocks[h] = struct{}{}
				}
			}
		case kvevents.Removed:
			for _, h := range e.Hashes {
				delete(r.blocks, h)
			}
		case kvevents.Cleared:
			r.blocks = map[uint64]struct{}{}
		}
	}
	if reset {
		r.resetLocked()
		return
	}
	r.seq++
	r.sendLocked(Change{Seq: r.seq, Events: b.Events})
}

// Lost: the engine's events before seq are gone (kvevents.Handler). The
// blocks known may be wrong both ways, so they are dropped: routers get an
// empty snapshot and the index fills again from the next stores (a missed
// block only costs a hit nobody sees; a stale one would send requests to a
// replica for a prefix it no longer has).
func (r *Relay) Lost(_ uint64, _ bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.stats.Lost++
	r.blocks = map[uint64]struct{}{}
	r.resetLocked()
}

// Bad counts a message that could not be read (kvevents.Handler).
func (r *Relay) Bad(error) {
	r.mu.Lock()
	r.stats.Bad++
	r.mu.Unlock()
}

func (r *Relay) snapshotLocked() *Snapshot {
	s := &Snapshot{Seq: r.seq, Info: r.info, Blocks: make([]uint64, 0, len(r.blocks))}
	for h := range r.blocks {
		s.Blocks = append(s.Blocks, h)
	}
	return s
}

func (r *Relay) resetLocked() {
	r.seq++
	r.sendLocked(Change{Seq: r.seq, Reset: r.snapshotLocked()})
}

func (r *Relay) sendLocked(c Change) {
	for s := range r.subs {
		select {
		case s.ch <- c:
		default:
			// Behind by a whole buffer: end its stream; it comes back for a
			// snapshot. Memory stays bounded whatever a router does.
			s.overrun = true
			close(s.ch)
			delete(r.subs, s)
			r.stats.Overruns++
		}
	}
}

// Subscribe returns the blocks held now and the changes after them. The
// channel closes when the relay does or the reader fell too far behind
// (overrun then reports true); cancel ends the subscription.
func (r *Relay) Subscribe() (snap *Snapshot, changes <-chan Change, overrun func() bool, cancel func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := &sub{ch: make(chan Change, subscriberBuffer)}
	if r.closed {
		close(s.ch)
	} else {
		r.subs[s] = struct{}{}
	}
	return r.snapshotLocked(), s.ch, func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			return s.overrun
		}, func() {
			r.mu.Lock()
			defer r.mu.Unlock()
			if _, ok := r.subs[s]; ok {
				delete(r.subs, s)
				close(s.ch)
			}
		}
}

// Close ends every subscription: the engine run is over.
func (r *Relay) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.closed = true
	for s := range r.subs {
		close(s.ch)
		delete(r.subs, s)
	}
}

// Stats returns the relay's counts and the blocks it holds.
func (r *Relay) Stats() (Stats, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats, len(r.blocks)
}
