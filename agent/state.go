package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/spec"
)

// Member is one node of a replica group.
type Member struct {
	NodeID string `json:"node_id"`
	Rank   int    `json:"rank"`
	GRPC   string `json:"grpc"`
}

// Assignment places this node in a replica group.
type Assignment struct {
	Deployment string           `json:"deployment"`
	Group      string           `json:"group"`
	Epoch      uint64           `json:"epoch"`
	Rank       int              `json:"rank"`
	Members    []Member         `json:"members"`
	Spec       *spec.Deployment `json:"spec"`
}

// RunRecord is the running engine's identity: what a restarted agent needs
// to adopt it and carry on in the same (group, epoch, term) and role.
type RunRecord struct {
	Group string       `json:"group"`
	Epoch uint64       `json:"epoch"`
	Term  uint64       `json:"term"`
	Head  string       `json:"head"`
	Role  engine.Role  `json:"role"`
	Plan  *engine.Plan `json:"plan"`
	// Runtime is the engine.runtime the commands run under.
	Runtime string `json:"runtime"`
}

// State is what the agent persists under its state directory.
type State struct {
	NodeID     string      `json:"node_id"`
	Assignment *Assignment `json:"assignment,omitempty"`
	LastTerm   uint64      `json:"last_term"`
	Run        *RunRecord  `json:"run,omitempty"`
	// Engines are the run's started commands, in start order.
	Engines []engine.Record `json:"engines,omitempty"`
	// Draining: the coordinator asked this node's head to take no new
	// requests (scale-in); it stays so across an agent restart.
	Draining bool `json:"draining,omitempty"`
	// CoordinatorTerm is the newest coordinator leader's Raft term this node
	// obeyed; commands from older terms are refused (fencing).
	CoordinatorTerm uint64 `json:"coordinator_term,omitempty"`
}

const stateFile = "state.json"

// LoadState reads the state file; a missing file is an empty state.
func LoadState(dir string) (State, error) {
	var s State
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if os.IsNotExist(err) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("read state: %w", err)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("state file %s is corrupt (%w); move it aside to start this node fresh", filepath.Join(dir, stateFile), err)
	}
	return s, nil
}

// Save writes the state atomically: a temp file, fsync, rename, fsync the dir.
func (s State) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, stateFile+".*")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, stateFile)); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
