// Package replicate makes the coordinator's store the replicated state
// machine of a Raft group of coordinators (hashicorp/raft, with raft-boltdb
// for the log and a file snapshot store): every write is a command in the
// Raft log, applied in the same order to each server's own bbolt copy, so
// any server can answer reads and a majority must have a write before it is
// acknowledged. docs/design/ha.md says how it is used.
package replicate

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/spec"
)

// Server is one member of the Raft group: its node id and Raft address.
type Server struct {
	ID   string
	Addr string
}

// ParseServers reads "id=host:port" items (the --servers flag).
func ParseServers(items []string) ([]Server, error) {
	var out []Server
	seen := map[string]bool{}
	for _, it := range items {
		for _, f := range strings.Split(it, ",") {
			f = strings.TrimSpace(f)
			if f == "" {
				continue
			}
			id, addr, ok := strings.Cut(f, "=")
			if !ok || id == "" || addr == "" {
				return nil, fmt.Errorf("server %q: write it as node-id=host:port (the server's --node-id and --raft-addr)", f)
			}
			if _, _, err := net.SplitHostPort(addr); err != nil {
				return nil, fmt.Errorf("server %q: %v", f, err)
			}
			if seen[id] {
				return nil, fmt.Errorf("server %q is named twice", id)
			}
			seen[id] = true
			out = append(out, Server{ID: id, Addr: addr})
		}
	}
	return out, nil
}

// Profiles of Raft timeouts. "lan" (the default) is for servers on one
// network: a leader's loss is noticed within 0.5–1 s and a new one elected
// in about as long again. "wan" is hashicorp/raft's own defaults (1 s).
const (
	ProfileLAN = "lan"
	ProfileWAN = "wan"
)

// Config configures one server.
type Config struct {
	ID   string // the coordinator's node id (the Raft server id)
	Addr string // host:port Raft listens on; it is also the address others dial
	Dir  string // where the log, the snapshots and the state copy live
	// Servers is the initial set; every server started with the same set
	// bootstraps the same configuration. Empty: the server waits to be added
	// (`shoal operator raft add-peer`) or resumes the state in Dir.
	Servers []Server
	Profile string
	// Legacy is a single-node coordinator's store to take over (the upgrade
	// path): imported once, by a server that bootstraps alone.
	Legacy       string
	Logger       *slog.Logger
	ApplyTimeout time.Duration // per write; default 5 s
	// ServerTLS and ClientTLS, when set, carry Raft over mutual TLS
	// (security.PeerTLS with the coordinator role); nil: plain TCP.
	ServerTLS, ClientTLS *tls.Config
}

// ErrNotLeader is returned for a write on a server that is not the leader.
type ErrNotLeader struct {
	Leader string // the leader's server id; "" when there is none
	// Uncertain: the leadership was lost while the write was being
	// committed; it may still take effect (a new leader may commit it).
	Uncertain bool
}

func (e *ErrNotLeader) Error() string {
	if e.Uncertain {
		return "the coordinator leader lost its leadership while the write was being committed: it may or may not have taken effect (check with `shoal get`)"
	}
	if e.Leader == "" {
		return "no coordinator leader: the Raft group has no quorum (a majority of servers must answer each other); writes fail until one is elected, reads show the last state"
	}
	return "this coordinator is not the leader (" + e.Leader + " is)"
}

// Node is one coordinator's Raft server and its copy of the store.
type Node struct {
	cfg     Config
	raft    *raft.Raft
	fsm     *fsm
	trans   *raft.NetworkTransport
	logs    *raftboltdb.BoltStore
	changes chan struct{}
	stop    chan struct{}
	done    sync.WaitGroup
	// term is the Raft term this server leads in; 0 while it does not.
	term atomic.Uint64
}

// Open starts the server. It returns once Raft runs; leadership comes later.
func Open(cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ApplyTimeout == 0 {
		cfg.ApplyTimeout = 5 * time.Second
	}
	if cfg.ID == "" || cfg.Addr == "" {
		return nil, errors.New("raft: a server needs its node id and --raft-addr")
	}
	if len(cfg.Servers) > 0 && !containsID(cfg.Servers, cfg.ID) {
		return nil, fmt.Errorf("raft: --servers must name this server too (%s=%s)", cfg.ID, cfg.Addr)
	}
	conf := raft.DefaultConfig()
	switch cfg.Profile {
	case "", ProfileLAN:
		conf.HeartbeatTimeout = 500 * time.Millisecond
		conf.ElectionTimeout = 500 * time.Millisecond
		conf.LeaderLeaseTimeout = 250 * time.Millisecond
		conf.CommitTimeout = 20 * time.Millisecond
	case ProfileWAN:
	default:
		return nil, fmt.Errorf("raft profile %q: lan or wan", cfg.Profile)
	}
	conf.LocalID = raft.ServerID(cfg.ID)
	hl := hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: &slogWriter{cfg.Logger.With("component", "raft")}})
	conf.Logger = hl
	notify := make(chan bool, 16)
	conf.NotifyCh = notify

	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("raft dir: %w", err)
	}
	// The state copy is rebuilt from the snapshot and the log at each start.
	statePath := filepath.Join(cfg.Dir, "state.db")
	if err := os.Remove(statePath); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	st, err := store.Open(statePath)
	if err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, fsm: &fsm{st: st}, changes: make(chan struct{}, 1), stop: make(chan struct{})}
	fail := func(err error) (*Node, error) {
		if n.trans != nil {
			n.trans.Close()
		}
		n.closeStores()
		return nil, err
	}
	n.logs, err = raftboltdb.NewBoltStore(filepath.Join(cfg.Dir, "raft.db"))
	if err != nil {
		return fail(fmt.Errorf("raft log: %w", err))
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.Dir, 3, hl)
	if err != nil {
		return fail(fmt.Errorf("raft snapshots: %w", err))
	}
	adv, err := net.ResolveTCPAddr("tcp", cfg.Addr)
	if err != nil {
		return fail(fmt.Errorf("--raft-addr %s: %w", cfg.Addr, err))
	}
	if cfg.ServerTLS != nil {
		l, err := net.Listen("tcp", cfg.Addr)
		if err != nil {
			return fail(fmt.Errorf("raft transport on %s: %w", cfg.Addr, err))
		}
		stream := &tlsStream{Listener: &advertised{l, adv}, server: cfg.ServerTLS, client: cfg.ClientTLS, log: cfg.Logger}
		n.trans = raft.NewNetworkTransportWithLogger(stream, 3, 10*time.Second, hl)
	} else {
		n.trans, err = raft.NewTCPTransportWithLogger(cfg.Addr, adv, 3, 10*time.Second, hl)
		if err != nil {
			return fail(fmt.Errorf("raft transport on %s: %w", cfg.Addr, err))
		}
	}
	existing, err := raft.HasExistingState(n.logs, n.logs, snaps)
	if err != nil {
		return fail(err)
	}
	legacy, err := legacyDump(cfg.Legacy)
	if err != nil {
		return fail(err)
	}
	importing := false
	if legacy != nil && existing {
		cfg.Logger.Warn("a single-node store is beside the replicated one and is ignored (it was taken over before, or this server joined an existing group)", "file", cfg.Legacy)
	} else if legacy != nil {
		if len(cfg.Servers) != 1 {
			return fail(fmt.Errorf("%s holds a single-node coordinator's store (%d deployment(s)): to take it over, start this server alone first "+
				"(--servers %s=%s), then add the others with `shoal operator raft add-peer`", cfg.Legacy, len(legacy.Deployments), cfg.ID, cfg.Addr))
		}
		importing = true
	}
	if !existing && len(cfg.Servers) > 0 {
		var c raft.Configuration
		for _, s := range cfg.Servers {
			c.Servers = append(c.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(s.ID), Address: raft.ServerAddress(s.Addr)})
		}
		if err := raft.BootstrapCluster(conf, n.logs, n.logs, snaps, n.trans, c); err != nil {
			return fail(fmt.Errorf("raft bootstrap: %w", err))
		}
	}
	n.raft, err = raft.NewRaft(conf, n.fsm, n.logs, n.logs, snaps, n.trans)
	if err != nil {
		return fail(fmt.Errorf("raft: %w", err))
	}
	n.done.Add(1)
	go n.watch(notify)
	if importing {
		if err := n.takeOver(legacy); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

func containsID(ss []Server, id string) bool {
	for _, s := range ss {
		if s.ID == id {
			return true
		}
	}
	return false
}

// legacyDump reads a single-node store; nil when there is none or it is empty.
func legacyDump(path string) (*store.Dump, error) {
	if path == "" {
		return nil, nil
	}
	if _, err := os.Stat(path); os.IsNotExist(err) {
		return nil, nil
	}
	st, err := store.Open(path)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	d, err := st.Dump()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(d.Deployments) == 0 && len(d.Groups) == 0 {
		return nil, nil
	}
	return d, nil
}

// takeOver imports a single-node store as the group's first command, then
// moves the file aside so that it is never imported twice.
func (n *Node) takeOver(d *store.Dump) error {
	deadline := time.Now().Add(30 * time.Second)
	for !n.Leading() {
		if time.Now().After(deadline) {
			return errors.New("taking over the single-node store: this server was not elected within 30 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := n.apply(command{Op: opImport, Dump: d}); err != nil {
		return fmt.Errorf("taking over %s: %w", n.cfg.Legacy, err)
	}
	aside := n.cfg.Legacy + ".imported"
	if err := os.Rename(n.cfg.Legacy, aside); err != nil {
		return fmt.Errorf("the single-node store was imported, but could not be moved aside (%v): move %s away before the next start", err, n.cfg.Legacy)
	}
	n.cfg.Logger.Info("took over the single-node store", "deployments", len(d.Deployments), "groups", len(d.Groups), "moved to", aside)
	return nil
}

// watch follows leadership changes: the term is taken once this server has
// confirmed it leads (a majority answered), so that a command it sends an
// agent never carries a term it did not lead in.
func (n *Node) watch(notify <-chan bool) {
	defer n.done.Done()
	for {
		select {
		case <-n.stop:
			return
		case lead := <-notify:
			n.term.Store(0)
			if lead {
				term := n.raft.CurrentTerm()
				if n.raft.VerifyLeader().Error() == nil && n.raft.Barrier(n.cfg.ApplyTimeout).Error() == nil && n.raft.CurrentTerm() == term {
					n.term.Store(term)
					n.initCluster()
				}
			}
			select {
			case n.changes <- struct{}{}:
			default:
			}
		}
	}
}

// initCluster gives a new group its identity (the first leader does).
func (n *Node) initCluster() {
	if id, err := n.fsm.st.ClusterID(); err != nil || id != "" {
		return
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	if _, err := n.apply(command{Op: opInit, Name: hex.EncodeToString(b)}); err != nil {
		n.cfg.Logger.Warn("raft: could not record the cluster's identity; the next leader will", "err", err)
	}
}

// ClusterID is the group's identity ("" until its first leader set it).
func (n *Node) ClusterID() (string, error) { return n.fsm.st.ClusterID() }

// Dump is this server's copy of the store, with the log index it is at.
func (n *Node) Dump() (*store.Dump, uint64, error) {
	idx := n.AppliedIndex()
	d, err := n.fsm.st.Dump()
	return d, idx, err
}

// Restore replaces the whole store with a saved one of the same cluster
// (leader only).
func (n *Node) Restore(d *store.Dump) error {
	if err := SameCluster(n.fsm.st, d); err != nil {
		return err
	}
	_, err := n.apply(command{Op: opRestore, Dump: d})
	return err
}

// Changes pulses when this server gains or loses the leadership.
func (n *Node) Changes() <-chan struct{} { return n.changes }

// Leading reports whether this server leads; LeaderTerm the term it leads
// in (0 when it does not).
func (n *Node) Leading() bool { return n.LeaderTerm() != 0 }

// LeaderTerm is the term this server leads in; 0 when it does not.
func (n *Node) LeaderTerm() uint64 {
	t := n.term.Load()
	if t == 0 || n.raft.State() != raft.Leader || n.raft.CurrentTerm() != t {
		return 0
	}
	return t
}

// Leader is the current leader's server id ("" when none is known).
func (n *Node) Leader() string {
	_, id := n.raft.LeaderWithID()
	return string(id)
}

// Peer is one server as `shoal operator raft list-peers` shows it.
type Peer struct {
	ID, Addr string
	Voter    bool
	Leader   bool
}

// Peers is the group's configuration.
func (n *Node) Peers() ([]Peer, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	leader := n.Leader()
	var out []Peer
	for _, s := range f.Configuration().Servers {
		out = append(out, Peer{ID: string(s.ID), Addr: string(s.Address), Voter: s.Suffrage == raft.Voter, Leader: string(s.ID) == leader})
	}
	return out, nil
}

// AddPeer adds a voting server (leader only).
func (n *Node) AddPeer(id, addr string) error {
	if !n.Leading() {
		return &ErrNotLeader{Leader: n.Leader()}
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("peer address %q: %v", addr, err)
	}
	return n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, n.cfg.ApplyTimeout).Error()
}

// RemovePeer removes a server (leader only).
func (n *Node) RemovePeer(id string) error {
	if !n.Leading() {
		return &ErrNotLeader{Leader: n.Leader()}
	}
	peers, err := n.Peers()
	if err != nil {
		return err
	}
	found := false
	for _, p := range peers {
		found = found || p.ID == id
	}
	if !found {
		return fmt.Errorf("no server %q in the group (see `shoal operator raft list-peers`)", id)
	}
	return n.raft.RemoveServer(raft.ServerID(id), 0, n.cfg.ApplyTimeout).Error()
}

// Stats are the figures the coordinator exports: term, commit and applied
// index, and the time since the leader was last heard from.
type Stats struct {
	State        string
	Term         uint64
	CommitIndex  uint64
	AppliedIndex uint64
	LastContact  time.Duration // followers; 0 on the leader or when never
}

// Stats reads the server's figures.
func (n *Node) Stats() Stats {
	s := Stats{State: n.raft.State().String(), Term: n.raft.CurrentTerm(), CommitIndex: n.raft.CommitIndex(), AppliedIndex: n.AppliedIndex()}
	if n.raft.State() != raft.Leader {
		if t := n.raft.LastContact(); !t.IsZero() {
			s.LastContact = time.Since(t)
		}
	}
	return s
}

// ReadIndex is the leader's commit index once it has confirmed, with a
// majority, that it still leads (leader only): every write acknowledged
// before the call is at or below it.
//
// The index returned is that of the last entry at or below the commit index
// that reaches the store (a command or a configuration change): a leader's
// no-op at the start of its term never does, and a server waiting for the
// commit index itself would wait for the next write.
func (n *Node) ReadIndex() (uint64, error) {
	if !n.Leading() {
		return 0, &ErrNotLeader{Leader: n.Leader()}
	}
	idx := n.raft.CommitIndex()
	if err := n.raft.VerifyLeader().Error(); err != nil {
		return 0, &ErrNotLeader{Leader: n.Leader()}
	}
	for i := idx; i > 0; i-- {
		var l raft.Log
		if err := n.logs.GetLog(i, &l); err != nil {
			// Compacted into a snapshot long applied here: this server's
			// copy is the state to wait for.
			return n.AppliedIndex(), nil
		}
		if l.Type == raft.LogCommand || l.Type == raft.LogConfiguration {
			return i, nil
		}
	}
	return 0, nil
}

// WaitApplied returns once this server's copy holds entry i.
func (n *Node) WaitApplied(ctx context.Context, i uint64) error { return n.fsm.waitIndex(ctx, i) }

// AppliedIndex is the last log entry this server's copy of the store holds.
func (n *Node) AppliedIndex() uint64 { return n.fsm.index.Load() }

// Snapshot takes a snapshot now (log compaction on demand).
func (n *Node) Snapshot() error { return n.raft.Snapshot().Error() }

// Close leaves Raft running nowhere: it shuts the server down and closes its
// files. The others elect a new leader if it led.
func (n *Node) Close() error {
	close(n.stop)
	var err error
	if n.raft != nil {
		err = n.raft.Shutdown().Error()
	}
	n.done.Wait()
	if n.trans != nil {
		n.trans.CloseStreams() // the pooled connections out, so the peers' readers end
		n.trans.Close()
	}
	n.closeStores()
	return err
}

func (n *Node) closeStores() {
	if n.logs != nil {
		n.logs.Close()
	}
	n.fsm.st.Close()
}

// The store's methods, as the coordinator uses them: reads from this
// server's copy, writes through the log.

func (n *Node) PutDeployment(d *spec.Deployment, yaml string) (bool, error) {
	r, err := n.apply(command{Op: opPutDeployment, At: time.Now().UTC(), Deployment: d, YAML: yaml})
	return r.Created, err
}

func (n *Node) Deployment(name string) (*store.DeploymentRecord, error) {
	return n.fsm.st.Deployment(name)
}

func (n *Node) Deployments() ([]*store.DeploymentRecord, error) { return n.fsm.st.Deployments() }

func (n *Node) DeleteDeployment(name string) error {
	_, err := n.apply(command{Op: opDeleteDeployment, Name: name})
	return err
}

func (n *Node) PutGroup(g *store.Group) error {
	_, err := n.apply(command{Op: opPutGroup, Group: g})
	return err
}

func (n *Node) PutGroups(gs []*store.Group) error {
	_, err := n.apply(command{Op: opPutGroups, Groups: gs})
	return err
}

func (n *Node) DeleteGroup(id string) error {
	_, err := n.apply(command{Op: opDeleteGroup, Name: id})
	return err
}

func (n *Node) Groups() ([]*store.Group, error) { return n.fsm.st.Groups() }

func (n *Node) AdoptSpec(deployment, spec string) error {
	_, err := n.apply(command{Op: opAdoptSpec, Name: deployment, Spec: spec})
	return err
}

// apply commits a command and returns what applying it gave.
func (n *Node) apply(c command) (result, error) {
	if n.raft.State() != raft.Leader {
		return result{}, &ErrNotLeader{Leader: n.Leader()}
	}
	b, err := json.Marshal(c)
	if err != nil {
		return result{}, err
	}
	f := n.raft.Apply(b, n.cfg.ApplyTimeout)
	if err := f.Error(); err != nil {
		switch {
		case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return result{}, &ErrNotLeader{Leader: n.Leader()} // refused: not in the log
		case errors.Is(err, raft.ErrLeadershipLost):
			return result{}, &ErrNotLeader{Leader: n.Leader(), Uncertain: true}
		case errors.Is(err, raft.ErrEnqueueTimeout):
			return result{}, fmt.Errorf("the leader did not take the write within %v (it is overloaded): nothing was written, try again", n.cfg.ApplyTimeout)
		}
		return result{}, err
	}
	r, _ := f.Response().(result)
	return r, r.err()
}

// slogWriter takes hclog's lines into the coordinator's log.
type slogWriter struct{ log *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	w.log.Warn(strings.TrimSpace(string(p)))
	return len(p), nil
}

var _ io.Writer = (*slogWriter)(nil)

// advertised is a listener that reports the address peers dial.
type advertised struct {
	net.Listener
	addr net.Addr
}

func (a *advertised) Addr() net.Addr { return a.addr }
