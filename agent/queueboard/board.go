// Package queueboard sums what the routers in front of one replica report
// queued for its prefill, so that each router sees the others' queues as
// well as its own (docs/design/kv-events.md §4). The head serves it over the
// Replica API's Queue stream; a router's reports last as long as its stream.
package queueboard

import (
	"fmt"
	"maps"
	"sync"
)

// Limits on one report: a replica has one endpoint, or one per
// data-parallel rank; a report naming more is not from a router.
const (
	MaxEndpoints = 1024
	MaxNameBytes = 256
)

// Board is one replica's routers and their latest reports.
type Board struct {
	mu      sync.Mutex
	next    int
	members map[int]*member // guarded by mu
}

type member struct {
	tokens  map[string]int64 // its latest report
	waiting int64            // and the requests it holds for room
	changed chan struct{}    // a token: the others' sum may have changed (buffered 1)
}

// New returns an empty board.
func New() *Board { return &Board{members: map[int]*member{}} }

// Join adds a router with nothing queued. changed receives a token whenever
// another router's report changes; Others says the sum then.
func (b *Board) Join() (id int, changed <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.next++
	m := &member{tokens: map[string]int64{}, changed: make(chan struct{}, 1)}
	b.members[b.next] = m
	return b.next, m.changed
}

// Report replaces router id's queue: endpoint → prompt tokens it has sent
// and not seen prefilled (zero counts may be left out), and how many
// requests it holds waiting for room. A bad report is an error and changes
// nothing.
func (b *Board) Report(id int, tokens map[string]int64, waiting int64) error {
	if waiting < 0 {
		return fmt.Errorf("queue report: %d requests waiting; counts are never negative", waiting)
	}
	if len(tokens) > MaxEndpoints {
		return fmt.Errorf("queue report names %d endpoints; a replica has at most %d", len(tokens), MaxEndpoints)
	}
	clean := make(map[string]int64, len(tokens))
	for ep, n := range tokens {
		switch {
		case n < 0:
			return fmt.Errorf("queue report: %d tokens for %q; counts are never negative", n, ep)
		case ep == "" || len(ep) > MaxNameBytes:
			return fmt.Errorf("queue report: endpoint name of %d bytes; give host:port (at most %d bytes)", len(ep), MaxNameBytes)
		case n > 0:
			clean[ep] = n
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	m, ok := b.members[id]
	if !ok || (maps.Equal(m.tokens, clean) && m.waiting == waiting) {
		return nil
	}
	m.tokens, m.waiting = clean, waiting
	b.notifyLocked(id)
	return nil
}

// Others is the sum of every router's queue but id's, by endpoint, and of
// the requests they hold.
func (b *Board) Others(id int) (tokens map[string]int64, waiting int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	tokens = map[string]int64{}
	for mid, m := range b.members {
		if mid == id {
			continue
		}
		for ep, n := range m.tokens {
			tokens[ep] += n
		}
		waiting += m.waiting
	}
	return tokens, waiting
}

// Leave takes router id and its queue off the board.
func (b *Board) Leave(id int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	m, ok := b.members[id]
	if !ok {
		return
	}
	delete(b.members, id)
	if len(m.tokens) > 0 || m.waiting > 0 {
		b.notifyLocked(id)
	}
}

// Routers is how many routers are on the board.
func (b *Board) Routers() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.members)
}

func (b *Board) notifyLocked(from int) {
	for mid, m := range b.members {
		if mid == from {
			continue
		}
		select {
		case m.changed <- struct{}{}:
		default: // already told
		}
	}
}
