package gossip

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// PeerFile keeps the gossip addresses of the members a node saw, so that
// after a restart it joins them again (Config.Rejoin), as serf's snapshot
// does: a restarted coordinator would otherwise know nobody (agents joined
// it, not the reverse), and a restarted agent whose seed is down could not
// find its group.
type PeerFile struct {
	Path string
	mu   sync.Mutex
	last []string  // guarded by mu; what the file holds
	at   time.Time // guarded by mu; the last write
}

// peerSaveEvery bounds how often the file is rewritten (it only needs to be
// roughly current); the first peers are written at once, so that a node
// that restarts soon after it formed its cluster still finds it.
const peerSaveEvery = 10 * time.Second

// peerLook is how often Keep looks at the member list.
const peerLook = time.Second

// PeerLister is what Save reads: a Membership.
type PeerLister interface{ PeerAddrs() []string }

// Load returns the saved addresses (none when the file is missing or bad).
func (p *PeerFile) Load() []string {
	b, err := os.ReadFile(p.Path)
	if err != nil {
		return nil
	}
	var peers []string
	if json.Unmarshal(b, &peers) != nil {
		return nil
	}
	return peers
}

// Keep saves m's peers until ctx ends, on its own goroutine: no control
// loop waits for the file.
func (p *PeerFile) Keep(ctx context.Context, m PeerLister, log interface{ Debug(string, ...any) }) {
	t := time.NewTicker(peerLook)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := p.Save(m); err != nil {
			log.Debug("remember gossip peers", "err", err)
		}
	}
}

// Save writes m's current peers when they changed: at once the first time,
// then at most every 10 s.
func (p *PeerFile) Save(m PeerLister) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.last != nil && time.Since(p.at) < peerSaveEvery {
		return nil
	}
	peers := m.PeerAddrs()
	slices.Sort(peers)
	if len(peers) == 0 || slices.Equal(peers, p.last) {
		return nil
	}
	p.at = time.Now()
	b, _ := json.Marshal(peers)
	tmp := p.Path + ".tmp"
	if err := os.MkdirAll(filepath.Dir(p.Path), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("save peers: %w", err)
	}
	if err := os.Rename(tmp, p.Path); err != nil {
		return fmt.Errorf("save peers: %w", err)
	}
	p.last = peers
	return nil
}
