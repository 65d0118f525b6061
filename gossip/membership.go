package gossip

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Config says how a node joins the gossip cluster.
type Config struct {
	// Cluster is the cluster name: peers with another name are rejected, both
	// at the packet level (memberlist's label) and by tag.
	Cluster  string
	BindAddr string
	BindPort int
	// Join lists host:port of nodes to join; empty starts a new cluster.
	Join []string
	// Rejoin lists members seen before a restart: contacted once at start,
	// best effort (a node that finds none of them still starts).
	Rejoin []string
	// Profile picks memberlist timers: "lan" (default), "local", or "fast"
	// (sub-second failure detection, for tests and single-machine dev clusters).
	Profile string
	Logger  *slog.Logger
	// Keys encrypt gossip with AES-GCM (the first one sends); none is
	// cleartext. A node with a wrong or missing key cannot join.
	Keys [][]byte
	// KeyFile receives keyring changes made with KeyringOp.
	KeyFile string
}

// Membership is this node's view of the cluster.
type Membership struct {
	cfg     Config
	log     *slog.Logger
	ml      *memberlist.Memberlist
	changes chan struct{}

	mu      sync.Mutex
	local   Tag                  // guarded by mu
	warn    time.Time            // guarded by mu; last rejected-peer warning (rate limit)
	crashed bool                 // guarded by mu; stopped without leaving
	noLeave bool                 // guarded by mu; shut down without leaving
	members map[string]Tag       // guarded by mu; live peers by node id, from events
	seenOps map[string]time.Time // guarded by mu; keyring operations applied

	keyring *memberlist.Keyring
	bcast   *memberlist.TransmitLimitedQueue
	joined  chan struct{} // closed once the node is in a cluster
	// pub asks the publisher (started by Run) to broadcast the local tag:
	// memberlist's UpdateNode waits until the broadcast has gone out a few
	// gossip rounds, which no caller of SetTag should wait for.
	pub chan struct{}
}

// Crash stops gossip without telling anyone, as a dying host would. Fault tests
// use it; Run then returns without leaving.
func (m *Membership) Crash() {
	m.mu.Lock()
	m.crashed = true
	m.mu.Unlock()
	_ = m.ml.Shutdown()
}

// SkipLeave makes the coming shutdown silent: peers are not told this node
// left and keep its state until the failure detector suspects it. An agent
// restarting with its engines running uses it, so its group does not fail
// over in the second it takes to come back (memberlist refutes the suspicion
// when the new process joins under the same name).
func (m *Membership) SkipLeave() {
	m.mu.Lock()
	m.noLeave = true
	m.mu.Unlock()
}

// New prepares a membership that will advertise tag. It starts nothing.
func New(cfg Config, tag Tag) *Membership {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	tag.Cluster = cfg.Cluster
	return &Membership{cfg: cfg, log: cfg.Logger.With("component", "gossip"), local: tag,
		changes: make(chan struct{}, 1), members: map[string]Tag{}, joined: make(chan struct{}), pub: make(chan struct{}, 1)}
}

// Joined is closed once this node is in the cluster: it joined a seed, or
// it has no seeds and forms the cluster itself.
func (m *Membership) Joined() <-chan struct{} { return m.joined }

func profile(name string) (*memberlist.Config, error) {
	switch name {
	case "", "lan":
		return memberlist.DefaultLANConfig(), nil
	case "local":
		return memberlist.DefaultLocalConfig(), nil
	case "fast":
		c := memberlist.DefaultLocalConfig()
		// Failure detection in about 1-2 s on one machine: probe every 300 ms,
		// and a suspect is declared dead after about 2 probe intervals.
		c.ProbeInterval = 300 * time.Millisecond
		c.ProbeTimeout = 150 * time.Millisecond
		c.SuspicionMult = 2
		c.SuspicionMaxTimeoutMult = 2
		c.GossipInterval = 50 * time.Millisecond
		c.PushPullInterval = 2 * time.Second
		c.GossipToTheDeadTime = 2 * time.Second
		c.TCPTimeout = 2 * time.Second
		return c, nil
	default:
		return nil, fmt.Errorf("unknown gossip profile %q: one of lan, local, fast", name)
	}
}

// Start binds the gossip sockets. Call Run afterwards to join and to leave.
func (m *Membership) Start() error {
	c, err := profile(m.cfg.Profile)
	if err != nil {
		return err
	}
	m.mu.Lock()
	c.Name = m.local.ID
	m.mu.Unlock()
	c.BindAddr = m.cfg.BindAddr
	c.BindPort = m.cfg.BindPort
	c.AdvertiseAddr = m.cfg.BindAddr
	c.AdvertisePort = m.cfg.BindPort
	c.Label = "shoal/" + m.cfg.Cluster
	c.Delegate = (*delegate)(m)
	c.Events = (*events)(m)
	c.Alive = (*alive)(m)
	c.Merge = (*merge)(m)
	c.Logger = log.New(&logWriter{m.log}, "", 0)
	if len(m.cfg.Keys) > 0 {
		kr, err := memberlist.NewKeyring(m.cfg.Keys, m.cfg.Keys[0])
		if err != nil {
			return fmt.Errorf("gossip keys: %w", err)
		}
		c.Keyring, m.keyring = kr, kr
		c.GossipVerifyIncoming, c.GossipVerifyOutgoing = true, true
		m.mu.Lock()
		m.local.Keys = m.fingerprints()
		m.mu.Unlock()
	}
	m.bcast = &memberlist.TransmitLimitedQueue{NumNodes: func() int { return max(1, len(m.Members())) }, RetransmitMult: 4}
	ml, err := memberlist.Create(c)
	if err != nil {
		return fmt.Errorf("start gossip on %s:%d: %w", m.cfg.BindAddr, m.cfg.BindPort, err)
	}
	m.ml = ml
	return nil
}

// PeerAddrs are the gossip addresses of the other live members.
func (m *Membership) PeerAddrs() []string {
	local := m.ml.LocalNode().Name
	var out []string
	for _, n := range m.ml.Members() {
		if n.Name != local {
			out = append(out, net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))))
		}
	}
	return out
}

// Addr is the gossip address others join.
func (m *Membership) Addr() string {
	n := m.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Join contacts a few of addrs at random, at once, and merges their member
// lists: how a node that lost sight of everyone (cut off, then healed) gets
// the cluster back without waiting for others to gossip to it. It returns
// how many answered, after one TCP timeout at most; call it off any loop.
func (m *Membership) Join(addrs []string) (int, error) {
	if m.ml == nil || len(addrs) == 0 {
		return 0, nil
	}
	peers := append([]string(nil), addrs...)
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	peers = peers[:min(len(peers), 4)]
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	var errs []error
	for _, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := m.ml.Join([]string{p})
			mu.Lock()
			total += n
			if err != nil {
				errs = append(errs, err)
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	m.notify()
	if total > 0 {
		return total, nil
	}
	return 0, errors.Join(errs...)
}

// Run joins the seed nodes (retrying until one answers) and leaves the cluster
// when ctx ends.
func (m *Membership) Run(ctx context.Context) error {
	if m.ml == nil {
		return errors.New("gossip: Run before Start")
	}
	pctx, stopPub := context.WithCancel(ctx)
	pubDone := make(chan struct{})
	go func() { defer close(pubDone); m.publisher(pctx) }()
	defer func() { stopPub(); <-pubDone }()
	if len(m.cfg.Rejoin) > 0 {
		// In the background (a dead peer costs a TCP timeout), a few at
		// random: one answer brings the whole member list by push/pull.
		peers := append([]string(nil), m.cfg.Rejoin...)
		rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
		peers = peers[:min(len(peers), 8)]
		go func() {
			n, err := m.ml.Join(peers)
			m.log.Info("rejoined earlier members", "contacted", n, "of", len(peers), "members", m.ml.NumMembers(), "err", err)
			m.notify()
		}()
	}
	if len(m.cfg.Join) > 0 {
		backoff := 200 * time.Millisecond
		for {
			n, err := m.ml.Join(m.cfg.Join)
			if n > 0 {
				m.log.Info("joined cluster", "cluster", m.cfg.Cluster, "contacted", n, "members", m.ml.NumMembers())
				break
			}
			var hint string
			if len(m.cfg.Keys) > 0 {
				hint = "is a seed up, and does this node's gossip key file hold one of the cluster's keys?"
			} else {
				hint = "is a seed up? if the cluster encrypts gossip, this node needs its key file (--gossip-key-file)"
			}
			m.log.Warn("cannot join cluster yet; retrying", "seeds", m.cfg.Join, "err", err, "retry_in", backoff, "hint", hint)
			select {
			case <-ctx.Done():
				return m.shutdown()
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 5*time.Second)
		}
	}
	close(m.joined)
	<-ctx.Done()
	return m.shutdown()
}

func (m *Membership) shutdown() error {
	m.mu.Lock()
	crashed, noLeave := m.crashed, m.noLeave
	m.crashed = true
	m.mu.Unlock()
	if crashed {
		return nil
	}
	if noLeave {
		return m.ml.Shutdown()
	}
	if err := m.ml.Leave(time.Second); err != nil {
		m.log.Debug("leave", "err", err)
	}
	return m.ml.Shutdown()
}

// Changes receives a value (coalesced) whenever membership or a tag changes.
func (m *Membership) Changes() <-chan struct{} { return m.changes }

func (m *Membership) notify() {
	select {
	case m.changes <- struct{}{}:
	default: // a change is already pending; the owner will re-read everything
	}
}

// Local returns the tag this node advertises.
func (m *Membership) Local() Tag {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.local
}

// SetTag publishes a new local tag. It fails if the tag would not fit, and
// never waits for the broadcast (Run's publisher sends it).
func (m *Membership) SetTag(t Tag) error {
	t.Cluster = m.cfg.Cluster
	t.Keys = m.fingerprints()
	if _, err := t.Encode(); err != nil {
		return err
	}
	m.mu.Lock()
	same := m.local == t
	m.local = t
	if _, ok := m.members[t.ID]; ok || m.ml != nil {
		m.members[t.ID] = t
	}
	m.mu.Unlock()
	if same {
		return nil
	}
	m.notify()
	select {
	case m.pub <- struct{}{}:
	default: // a broadcast is already pending; it reads the newest tag
	}
	return nil
}

// publisher broadcasts the local tag after each SetTag, one broadcast at a
// time (a burst of changes coalesces into the newest tag), until ctx ends.
func (m *Membership) publisher(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.pub:
		}
		if err := m.ml.UpdateNode(2 * time.Second); err != nil {
			m.log.Debug("tag broadcast", "err", err)
		}
	}
}

// Members returns the decoded tags of the live members (alive or suspect),
// self included. Members with undecodable tags are left out.
func (m *Membership) Members() map[string]Tag {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]Tag, len(m.members))
	for k, v := range m.members {
		out[k] = v
	}
	return out
}

// Member is one live member's tag (no copy of the whole list).
func (m *Membership) Member(id string) (Tag, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.members[id]
	return t, ok
}

// Count is the number of live members, self included (no copy).
func (m *Membership) Count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.members)
}

// record keeps our own copy of a member's tag: memberlist mutates the Node
// it hands to callbacks, so it must not be read later without its lock.
// Called from memberlist callbacks: decoding only, no I/O, no waiting.
func (m *Membership) record(n *memberlist.Node, present bool) {
	m.mu.Lock()
	old, had := m.members[n.Name]
	if present {
		if t, err := DecodeTag(n.Meta); err == nil && t.Cluster == m.cfg.Cluster {
			m.members[n.Name] = t
		} else {
			delete(m.members, n.Name)
		}
	} else {
		delete(m.members, n.Name)
	}
	cur, has := m.members[n.Name]
	m.mu.Unlock()
	// memberlist also reports updates that change nothing a watcher reads
	// (an incarnation bump after a refuted suspicion): no wake-up for those,
	// which at a thousand members under load would be a hundred a second.
	if had != has || old != cur {
		m.notify()
	}
}

// check rejects peers of another cluster or with a bad tag.
func (m *Membership) check(n *memberlist.Node) error {
	t, err := DecodeTag(n.Meta)
	if err == nil && t.Cluster != m.cfg.Cluster {
		err = fmt.Errorf("peer %s is in cluster %q, not %q", n.Name, t.Cluster, m.cfg.Cluster)
	}
	if err == nil && t.ID != n.Name {
		err = fmt.Errorf("peer %s advertises id %q", n.Name, t.ID)
	}
	if err != nil {
		m.mu.Lock()
		loud := time.Since(m.warn) > 10*time.Second
		if loud {
			m.warn = time.Now()
		}
		m.mu.Unlock()
		if loud {
			m.log.Warn("rejected gossip peer", "peer", n.Name, "addr", n.Address(), "err", err)
		}
	}
	return err
}

type delegate Membership

func (d *delegate) NodeMeta(limit int) []byte {
	m := (*Membership)(d)
	b, err := m.Local().Encode()
	if err != nil || len(b) > limit {
		m.log.Error("local tag does not fit; advertising none", "err", err)
		return nil
	}
	return b
}
func (d *delegate) NotifyMsg(b []byte) { (*Membership)(d).handleMsg(b) }
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return (*Membership)(d).bcast.GetBroadcasts(overhead, limit)
}
func (d *delegate) LocalState(bool) []byte        { return nil }
func (d *delegate) MergeRemoteState([]byte, bool) {}

type events Membership

func (e *events) NotifyJoin(n *memberlist.Node)   { (*Membership)(e).record(n, true) }
func (e *events) NotifyLeave(n *memberlist.Node)  { (*Membership)(e).record(n, false) }
func (e *events) NotifyUpdate(n *memberlist.Node) { (*Membership)(e).record(n, true) }

type alive Membership

func (a *alive) NotifyAlive(n *memberlist.Node) error { return (*Membership)(a).check(n) }

type merge Membership

func (mg *merge) NotifyMerge(peers []*memberlist.Node) error {
	for _, n := range peers {
		if err := (*Membership)(mg).check(n); err != nil {
			return err
		}
	}
	return nil
}

// logWriter routes memberlist's "[LEVEL] memberlist: …" lines to slog.
type logWriter struct{ log *slog.Logger }

func (w *logWriter) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	lvl := slog.LevelDebug
	switch {
	case bytes.HasPrefix(p, []byte("[ERR")):
		lvl = slog.LevelWarn
	case bytes.HasPrefix(p, []byte("[WARN")):
		lvl = slog.LevelInfo
	}
	w.log.Log(context.Background(), lvl, line)
	return len(p), nil
}
