package gossip

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// PeerFile keeps the gossip addresses of the members a node saw, so that
// after a restart it joins them again (Config.Rejoin), as serf's snapshot
// does: a restarted coordinator would otherwise know nobody (agents joined
// it, not the reverse), and a restarted agent whose seed is down could not
// find its group.
type PeerFile struct {
	Path string
	mu   sync.Mutex
	last []string
}

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

// Save writes m's current peers when they changed.
func (p *PeerFile) Save(m *Membership) error {
	peers := m.PeerAddrs()
	slices.Sort(peers)
	p.mu.Lock()
	defer p.mu.Unlock()
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
