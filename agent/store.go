package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"sync"
)

// stateStore is the one writer of state.json. The supervisor hands it the
// state after every change (Save never waits); its goroutine writes the
// newest one (fsync, rename) and skips states equal to the last written.
// A caller that must not answer before the state is durable (Assign,
// Release, Drain) waits for the generation Save returned.
type stateStore struct {
	dir string
	log *slog.Logger

	mu      sync.Mutex
	pending *State // guarded by mu; newest state not yet written
	gen     uint64 // guarded by mu; generation of pending (or of the last Save)
	written uint64 // guarded by mu; generation durable on disk
	err     error  // guarded by mu; the last write's error
	changed chan struct{}
	kick    chan struct{}
	last    []byte // writer goroutine only
}

func newStateStore(dir string, log *slog.Logger, saved State) *stateStore {
	s := &stateStore{dir: dir, log: log, changed: make(chan struct{}), kick: make(chan struct{}, 1)}
	s.last, _ = json.Marshal(saved)
	return s
}

// Save queues st and returns its generation.
func (s *stateStore) Save(st State) uint64 {
	s.mu.Lock()
	s.gen++
	s.pending = &st
	g := s.gen
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
	return g
}

// Wait blocks until generation gen (or a later one) is on disk, and returns
// the error of the write that covered it.
func (s *stateStore) Wait(ctx context.Context, gen uint64) error {
	for {
		s.mu.Lock()
		done, err, ch := s.written >= gen, s.err, s.changed
		s.mu.Unlock()
		if done {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Run writes queued states until ctx ends, then writes the last one.
func (s *stateStore) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			s.flush()
			return
		case <-s.kick:
			s.flush()
		}
	}
}

func (s *stateStore) flush() {
	s.mu.Lock()
	st, gen := s.pending, s.gen
	s.pending = nil
	s.mu.Unlock()
	if st == nil {
		return
	}
	var err error
	b, _ := json.Marshal(st)
	if !bytes.Equal(b, s.last) {
		if err = st.Save(s.dir); err == nil {
			s.last = b
		} else {
			s.log.Error("persist state", "dir", s.dir, "err", err)
		}
	}
	s.mu.Lock()
	s.written, s.err = gen, err
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}
