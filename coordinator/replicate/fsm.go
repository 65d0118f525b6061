package replicate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/spec"
)

// The commands of the log: one per write the coordinator makes.
const (
	opPutDeployment    = "put_deployment"
	opDeleteDeployment = "delete_deployment"
	opPutGroup         = "put_group"
	opPutGroups        = "put_groups" // a reconcile pass's groups, in one entry
	opDeleteGroup      = "delete_group"
	opAdoptSpec        = "adopt_spec"
	opImport           = "import"  // a single-node store taken over
	opRestore          = "restore" // `shoal operator snapshot restore`
	opInit             = "init"    // the cluster's identity, by its first leader
)

// command is one log entry (JSON). At is the leader's clock, so every server
// stores the same times.
type command struct {
	Op         string           `json:"op"`
	At         time.Time        `json:"at,omitzero"`
	Deployment *spec.Deployment `json:"deployment,omitempty"`
	YAML       string           `json:"yaml,omitempty"`
	Name       string           `json:"name,omitempty"`
	Group      *store.Group     `json:"group,omitempty"`
	Groups     []*store.Group   `json:"groups,omitempty"`
	Spec       string           `json:"spec,omitempty"`
	Dump       *store.Dump      `json:"dump,omitempty"`
}

// result is what applying a command gave (the same on every server: they
// apply the same commands to the same state).
type result struct {
	Created  bool
	Err      string
	NotFound bool
}

func (r result) err() error {
	switch {
	case r.NotFound:
		return fmt.Errorf("%s%w", strings.TrimSuffix(r.Err, store.ErrNotFound.Error()), store.ErrNotFound)
	case r.Err != "":
		return errors.New(r.Err)
	}
	return nil
}

func failed(err error) result {
	if err == nil {
		return result{}
	}
	return result{Err: err.Error(), NotFound: errors.Is(err, store.ErrNotFound)}
}

// fsm applies the log to this server's copy of the store.
type fsm struct {
	st *store.Store
	// index is the last entry applied to st (Raft's own applied index runs
	// ahead: it counts entries handed to the FSM, not applied yet).
	index atomic.Uint64
	// moved is closed (and replaced) whenever index moves.
	mu    sync.Mutex
	moved chan struct{}
}

// setIndex records the applied index and wakes its waiters.
func (f *fsm) setIndex(i uint64) {
	f.index.Store(i)
	f.mu.Lock()
	if f.moved != nil {
		close(f.moved)
		f.moved = nil
	}
	f.mu.Unlock()
}

// waitIndex returns once index ≥ i, or with ctx's error.
func (f *fsm) waitIndex(ctx context.Context, i uint64) error {
	for {
		f.mu.Lock()
		if f.index.Load() >= i {
			f.mu.Unlock()
			return nil
		}
		if f.moved == nil {
			f.moved = make(chan struct{})
		}
		ch := f.moved
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("this coordinator's copy is at index %d, behind the leader's %d: %w", f.index.Load(), i, ctx.Err())
		}
	}
}

// snapshotVersion is the format of a snapshot; a newer one is refused.
const snapshotVersion = 1

type snapshotFile struct {
	Version int         `json:"version"`
	Index   uint64      `json:"index"`
	Dump    *store.Dump `json:"dump"`
}

// Apply applies one committed entry. An entry this version cannot read is a
// failed write (the same on every server), never a crash.
func (f *fsm) Apply(l *raft.Log) any {
	defer f.setIndex(l.Index)
	if l.Type != raft.LogCommand {
		return result{}
	}
	var c command
	if err := json.Unmarshal(l.Data, &c); err != nil {
		return failed(fmt.Errorf("log entry %d: %w", l.Index, err))
	}
	switch c.Op {
	case opPutDeployment:
		if c.Deployment == nil {
			return failed(errors.New("put_deployment without a deployment"))
		}
		created, err := f.st.PutDeploymentAt(c.Deployment, c.YAML, c.At)
		r := failed(err)
		r.Created = created
		return r
	case opDeleteDeployment:
		return failed(f.st.DeleteDeployment(c.Name))
	case opPutGroup:
		if c.Group == nil || c.Group.ID == "" {
			return failed(errors.New("put_group without a group"))
		}
		return failed(f.st.PutGroup(c.Group))
	case opPutGroups:
		for _, g := range c.Groups {
			if g == nil || g.ID == "" {
				return failed(errors.New("put_groups with a group without an id"))
			}
		}
		return failed(f.st.PutGroups(c.Groups))
	case opDeleteGroup:
		return failed(f.st.DeleteGroup(c.Name))
	case opAdoptSpec:
		return failed(f.st.AdoptSpec(c.Name, c.Spec))
	case opImport:
		empty, err := f.st.Empty()
		if err != nil {
			return failed(err)
		}
		if !empty {
			return failed(errors.New("the replicated store already holds records; a single-node store is only taken over by a new group"))
		}
		if c.Dump == nil {
			return failed(errors.New("import without records"))
		}
		return failed(f.st.Replace(c.Dump))
	case opRestore:
		if c.Dump == nil {
			return failed(errors.New("restore without records"))
		}
		if err := SameCluster(f.st, c.Dump); err != nil {
			return failed(err)
		}
		return failed(f.st.Replace(c.Dump))
	case opInit:
		if c.Name == "" {
			return failed(errors.New("init without a cluster id"))
		}
		_, err := f.st.InitClusterID(c.Name)
		return failed(err)
	}
	return failed(fmt.Errorf("log entry %d: unknown command %q (a newer coordinator wrote it: upgrade this one)", l.Index, c.Op))
}

// StoreConfiguration is told of each membership change of the group (as
// raft.ConfigurationStore): it counts as applied, so that a read waiting
// for an index at a configuration change does not wait for the next write.
func (f *fsm) StoreConfiguration(index uint64, _ raft.Configuration) { f.setIndex(index) }

var _ raft.ConfigurationStore = (*fsm)(nil)

// Snapshot captures the whole store now; Persist writes it later, while
// Apply goes on.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	d, err := f.st.Dump()
	if err != nil {
		return nil, err
	}
	return &snapshot{d, f.index.Load()}, nil
}

// Restore replaces the store with a snapshot's records.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var s snapshotFile
	if err := json.NewDecoder(rc).Decode(&s); err != nil {
		return fmt.Errorf("read snapshot: %w", err)
	}
	if s.Version != snapshotVersion || s.Dump == nil {
		return fmt.Errorf("snapshot format %d: this coordinator reads %d (upgrade it)", s.Version, snapshotVersion)
	}
	if err := f.st.Replace(s.Dump); err != nil {
		return err
	}
	f.setIndex(s.Index)
	return nil
}

type snapshot struct {
	d     *store.Dump
	index uint64
}

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode(snapshotFile{Version: snapshotVersion, Index: s.index, Dump: s.d}); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *snapshot) Release() {}

// SameCluster refuses a saved store of another cluster: a snapshot restores
// only the cluster it was saved from.
func SameCluster(st *store.Store, d *store.Dump) error {
	cur, err := st.ClusterID()
	if err != nil {
		return err
	}
	if d.ClusterID == "" || cur == "" || d.ClusterID != cur {
		return fmt.Errorf("the snapshot is of cluster %q and this is cluster %q: refused (a snapshot restores only the cluster it was saved from)",
			d.ClusterID, cur)
	}
	return nil
}
