package gossip

import (
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
	at   time.Time // guarded by mu; the last look at the member list
}

// peerSaveEvery bounds how often Save reads the member list: callers sit
// in loops that run several times a second, and the file only needs to be
// roughly current.
const peerSaveEvery = 10 * time.Second

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

// Save writes m's current peers when they changed, at most every 10 s.
func (p *PeerFile) Save(m *Membership) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.at) < peerSaveEvery {
		return nil
	}
	p.at = time.Now()
	peers := m.PeerAddrs()
	slices.Sort(peers)
	if len(peers) == 0 || slices.Equal(peers, p.last) {
		return nil
	}
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
