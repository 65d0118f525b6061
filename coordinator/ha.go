package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/coordinator/replicate"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
)

// A replicated coordinator (docs/design/ha.md): every server answers reads
// from its copy of the store; writes, and everything that acts (reconcile,
// autoscale, calls to agents), are the leader's. A write that reaches a
// follower is forwarded to the leader, so any server's address works.

// leading reports whether this coordinator acts: always for a single one.
func (c *Coordinator) leading() bool { return c.repl == nil || c.repl.Leading() }

// fenceTerm is the Raft term the leader's agent commands carry (0: a
// single coordinator, unfenced).
func (c *Coordinator) fenceTerm() uint64 {
	if c.repl == nil {
		return 0
	}
	return c.repl.LeaderTerm()
}

// leaderChanges pulses on a change of leadership (never for a single one).
func (c *Coordinator) leaderChanges() <-chan struct{} {
	if c.repl == nil {
		return nil
	}
	return c.repl.Changes()
}

// forwardedKey marks a call a follower forwarded (it is not forwarded twice).
const forwardedKey = "shoal-forwarded-by"

// forwardedMethods are the writes a follower hands to the leader, with
// their response types.
var forwardedMethods = map[string]func() any{
	coordv1.Coordinator_Apply_FullMethodName:            func() any { return &coordv1.ApplyResponse{} },
	coordv1.Coordinator_DeleteDeployment_FullMethodName: func() any { return &coordv1.DeleteDeploymentResponse{} },
	coordv1.Coordinator_Demand_FullMethodName:           func() any { return &coordv1.DemandResponse{} },
	coordv1.Coordinator_RaftAddPeer_FullMethodName:      func() any { return &coordv1.RaftPeerResponse{} },
	coordv1.Coordinator_RaftRemovePeer_FullMethodName:   func() any { return &coordv1.RaftPeerResponse{} },
	coordv1.Coordinator_ChangeAdapters_FullMethodName:   func() any { return &coordv1.ChangeAdaptersResponse{} },
}

// consistentReads are the reads of the store: on a replicated coordinator
// they wait until this server's copy holds every write acknowledged before
// them (the leader's read index).
var consistentReads = map[string]bool{
	coordv1.Coordinator_ListDeployments_FullMethodName:    true,
	coordv1.Coordinator_DescribeDeployment_FullMethodName: true,
	coordv1.Coordinator_ListReplicas_FullMethodName:       true,
	coordv1.Coordinator_ListNodes_FullMethodName:          true,
	coordv1.Coordinator_ListAdapters_FullMethodName:       true,
}

// readWait bounds how long a read waits for the leader's read index; past
// it (no leader, no quorum) the read answers from this server's last state.
const readWait = 2 * time.Second

// forward is the API's interceptor: on a follower, a write goes to the
// leader over the leader's own API, and its answer comes back as is; a
// read waits for this server's copy to catch up with the leader's read index.
func (c *Coordinator) forward(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if consistentReads[info.FullMethod] && c.repl != nil {
		if err := c.catchUp(ctx); err != nil {
			// The last state this server has, said to be so.
			_ = grpc.SetHeader(ctx, metadata.Pairs(StaleHeader, err.Error()))
		}
		return h(ctx, req)
	}
	newResp, ok := forwardedMethods[info.FullMethod]
	if !ok || c.leading() {
		return h(ctx, req)
	}
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get(forwardedKey)) > 0 {
		return nil, status.Error(codes.Unavailable, "the coordinator leader changed while the call was forwarded: try again")
	}
	conn, err := c.leaderConn()
	if err != nil {
		return nil, err
	}
	resp := newResp()
	ctx = metadata.AppendToOutgoingContext(ctx, forwardedKey, c.cfg.NodeID)
	if err := conn.Invoke(ctx, info.FullMethod, req, resp); err != nil {
		return nil, leaderUnreachable(c.repl.Leader(), conn.Target(), err)
	}
	return resp, nil
}

// leaderUnreachable words a transport failure toward the leader (its own
// answers pass as they are).
func leaderUnreachable(id, addr string, err error) error {
	st, _ := status.FromError(err)
	if st.Code() != codes.Unavailable || strings.Contains(st.Message(), "coordinator leader") {
		return err
	}
	return status.Errorf(codes.Unavailable, "the coordinator leader %s (%s) does not answer (%s): a new one is being elected, or quorum is lost; try again",
		id, addr, st.Message())
}

// StaleHeader, on a read's response, says it could not be confirmed
// current (no leader answered) and why: it is this server's last state.
const StaleHeader = "shoal-stale"

// catchUp waits until this server's copy holds the leader's read index; an
// error says why it could not (no leader, no quorum), and the read then
// answers from the last state this server has: reads keep working while
// writes cannot, and say so.
func (c *Coordinator) catchUp(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readWait)
	defer cancel()
	var idx uint64
	if c.repl.Leading() {
		i, err := c.repl.ReadIndex()
		if err != nil {
			return err
		}
		idx = i
	} else {
		conn, err := c.leaderConn()
		if err != nil {
			return err
		}
		resp, err := coordv1.NewCoordinatorClient(conn).ReadIndex(ctx, &coordv1.ReadIndexRequest{})
		if err != nil {
			return leaderUnreachable(c.repl.Leader(), conn.Target(), err)
		}
		idx = resp.Index
	}
	return c.repl.WaitApplied(ctx, idx)
}

func (s *apiServer) ReadIndex(context.Context, *coordv1.ReadIndexRequest) (*coordv1.ReadIndexResponse, error) {
	if s.c.repl == nil {
		return nil, status.Error(codes.FailedPrecondition, "this coordinator is not replicated")
	}
	idx, err := s.c.repl.ReadIndex()
	if err != nil {
		return nil, s.c.storeError(err)
	}
	return &coordv1.ReadIndexResponse{Index: idx}, nil
}

// leaderConns caches the connection to the leader's API.
type leaderConns struct {
	mu   sync.Mutex
	addr string
	conn *grpc.ClientConn
}

func (l *leaderConns) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn != nil {
		l.conn.Close()
		l.conn, l.addr = nil, ""
	}
}

// leaderConn is a connection to the leader's API, or the error that says
// why there is none (no quorum: how many servers answer).
func (c *Coordinator) leaderConn() (*grpc.ClientConn, error) {
	id := c.repl.Leader()
	if id == "" {
		return nil, c.noLeader()
	}
	t, ok := c.mem.Members()[id]
	if !ok || t.Kind != gossip.KindCoordinator || t.GRPC == "" {
		return nil, status.Errorf(codes.Unavailable, "the coordinator leader %s is not in this server's gossip yet: try again, or call it directly", id)
	}
	c.lconn.mu.Lock()
	defer c.lconn.mu.Unlock()
	if c.lconn.addr != t.GRPC {
		if c.lconn.conn != nil {
			c.lconn.conn.Close()
		}
		conn, err := c.cfg.TLS.Dial(t.GRPC)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "dial the coordinator leader %s at %s: %v", id, t.GRPC, err)
		}
		c.lconn.addr, c.lconn.conn = t.GRPC, conn
	}
	return c.lconn.conn, nil
}

// noLeader is the error of a write while the group has no leader.
func (c *Coordinator) noLeader() error {
	peers, err := c.repl.Peers()
	if err != nil {
		return status.Errorf(codes.Unavailable, "no coordinator leader: %v", err)
	}
	if len(peers) == 0 {
		return status.Errorf(codes.Unavailable, "no coordinator leader: this server (%s) is in no Raft group yet — started with --raft-addr and no --servers, "+
			"it waits to be added: run `shoal operator raft add-peer %s %s` against a server of the group", c.cfg.NodeID, c.cfg.NodeID, c.cfg.RaftAddr)
	}
	alive := 0
	members := c.mem.Members()
	for _, p := range peers {
		if t, ok := members[p.ID]; (ok && t.Kind == gossip.KindCoordinator) || p.ID == c.cfg.NodeID {
			alive++
		}
	}
	return status.Errorf(codes.Unavailable, "no coordinator leader: Raft quorum is lost (%d of %d servers answer in the gossip, %d are needed); "+
		"writes fail until a majority is back, reads show the last state", alive, len(peers), len(peers)/2+1)
}

// storeError maps a write's error: a lost leadership or quorum is
// Unavailable with what to do, the rest as apiError does.
func (c *Coordinator) storeError(err error) error {
	var nl *replicate.ErrNotLeader
	if errors.As(err, &nl) {
		if nl.Uncertain {
			return status.Errorf(codes.Unavailable, "%v", nl)
		}
		if nl.Leader == "" {
			return c.noLeader()
		}
		return status.Errorf(codes.Unavailable, "%v: try again (any coordinator's address works)", nl)
	}
	return apiError(err)
}

func (s *apiServer) Coordinators(context.Context, *coordv1.CoordinatorsRequest) (*coordv1.CoordinatorsResponse, error) {
	c := s.c
	resp := &coordv1.CoordinatorsResponse{AnsweredBy: c.cfg.NodeID, Replicated: c.repl != nil}
	members := c.mem.Members()
	if c.repl == nil {
		resp.State, resp.Leader = "Leader", c.cfg.NodeID
		resp.Servers = []*coordv1.CoordinatorInfo{{NodeId: c.cfg.NodeID, ApiAddr: c.cfg.APIAddr, Voter: true, Leader: true, Alive: true}}
		return resp, nil
	}
	st := c.repl.Stats()
	resp.State, resp.Term, resp.CommitIndex, resp.AppliedIndex = st.State, st.Term, st.CommitIndex, st.AppliedIndex
	resp.ClusterId, _ = c.repl.ClusterID()
	resp.LastContactMs, resp.Leader = st.LastContact.Milliseconds(), c.repl.Leader()
	peers, err := c.repl.Peers()
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	for _, p := range peers {
		ci := &coordv1.CoordinatorInfo{NodeId: p.ID, RaftAddr: p.Addr, Voter: p.Voter, Leader: p.Leader}
		if t, ok := members[p.ID]; ok && t.Kind == gossip.KindCoordinator {
			ci.ApiAddr, ci.Alive = t.GRPC, true
		}
		if p.ID == c.cfg.NodeID {
			ci.ApiAddr, ci.Alive = c.cfg.APIAddr, true
		}
		resp.Servers = append(resp.Servers, ci)
	}
	sort.Slice(resp.Servers, func(i, j int) bool { return resp.Servers[i].NodeId < resp.Servers[j].NodeId })
	return resp, nil
}

func (s *apiServer) RaftAddPeer(ctx context.Context, req *coordv1.RaftAddPeerRequest) (*coordv1.RaftPeerResponse, error) {
	if s.c.repl == nil {
		return nil, status.Error(codes.FailedPrecondition, "this coordinator is not replicated: start it with --raft-addr (and --servers) first")
	}
	if req.NodeId == "" || req.RaftAddr == "" {
		return nil, status.Error(codes.InvalidArgument, "add-peer needs the server's node id and Raft address")
	}
	if err := s.c.sameCluster(ctx, req.NodeId); err != nil {
		return nil, err
	}
	if err := s.c.repl.AddPeer(req.NodeId, req.RaftAddr); err != nil {
		return nil, s.c.storeError(err)
	}
	return &coordv1.RaftPeerResponse{Message: fmt.Sprintf("added %s (%s) as a voter", req.NodeId, req.RaftAddr)}, nil
}

// sameCluster checks a server before it is added: it must be in this
// cluster's gossip (same cluster name and keys), and hold no other group's
// state (a server of another cluster, even one under the same CA, is
// refused: its log would fight this group's).
func (c *Coordinator) sameCluster(ctx context.Context, id string) error {
	if id == c.cfg.NodeID {
		return status.Errorf(codes.InvalidArgument, "%s is this server", id)
	}
	t, ok := c.mem.Members()[id]
	if !ok || t.Kind != gossip.KindCoordinator || t.GRPC == "" {
		return status.Errorf(codes.FailedPrecondition, "coordinator %s is not in this cluster's gossip: start it joined to this cluster "+
			"(--join, the same --cluster and gossip key), with --raft-addr and no --servers, then add it", id)
	}
	conn, err := c.cfg.TLS.Dial(t.GRPC)
	if err != nil {
		return status.Errorf(codes.Unavailable, "dial %s at %s: %v", id, t.GRPC, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := coordv1.NewCoordinatorClient(conn).Coordinators(ctx, &coordv1.CoordinatorsRequest{})
	if err != nil {
		return status.Errorf(codes.Unavailable, "ask %s at %s which cluster it is in: %v", id, t.GRPC, err)
	}
	ours, _ := c.repl.ClusterID()
	switch {
	case !resp.Replicated:
		return status.Errorf(codes.FailedPrecondition, "coordinator %s runs without Raft: restart it with --raft-addr (and no --servers)", id)
	case len(resp.Servers) == 0:
		return nil // a fresh server, waiting to be added
	case ours != "" && resp.ClusterId == ours:
		return nil // one of ours (added again after a removal)
	}
	var names []string
	for _, sv := range resp.Servers {
		names = append(names, sv.NodeId)
	}
	return status.Errorf(codes.FailedPrecondition, "coordinator %s already belongs to another Raft group (servers %s, cluster %q; this is %q): refused. "+
		"To move it here, stop it, remove its --data-dir/raft and start it with --raft-addr and no --servers", id, strings.Join(names, ","), resp.ClusterId, ours)
}

func (s *apiServer) RaftRemovePeer(_ context.Context, req *coordv1.RaftRemovePeerRequest) (*coordv1.RaftPeerResponse, error) {
	if s.c.repl == nil {
		return nil, status.Error(codes.FailedPrecondition, "this coordinator is not replicated")
	}
	if err := s.c.repl.RemovePeer(req.NodeId); err != nil {
		return nil, s.c.storeError(err)
	}
	return &coordv1.RaftPeerResponse{Message: "removed " + req.NodeId}, nil
}

// snapshotChunk bounds one message of a snapshot stream.
const snapshotChunk = 1 << 20

// maxRestore bounds a snapshot a restore reads (far above any store).
const maxRestore = 1 << 30

// savedStore is the file `shoal operator snapshot save` writes.
type savedStore struct {
	Version int         `json:"shoal_snapshot"`
	Index   uint64      `json:"index"`
	SavedBy string      `json:"saved_by"`
	Dump    *store.Dump `json:"store"`
}

func (s *apiServer) SnapshotSave(_ *coordv1.SnapshotSaveRequest, stream coordv1.Coordinator_SnapshotSaveServer) error {
	if s.c.repl != nil {
		if err := s.c.catchUp(stream.Context()); err != nil { // every acknowledged write is in the file
			return status.Errorf(codes.Unavailable, "this coordinator cannot confirm its copy is current (%v): save from a server with a leader", err)
		}
	}
	d, idx, err := s.c.snap.Dump()
	if err != nil {
		return apiError(err)
	}
	b, err := json.Marshal(savedStore{Version: 1, Index: idx, SavedBy: s.c.cfg.NodeID, Dump: d})
	if err != nil {
		return apiError(err)
	}
	for len(b) > 0 {
		n := min(len(b), snapshotChunk)
		if err := stream.Send(&coordv1.SnapshotChunk{Data: b[:n]}); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func (s *apiServer) SnapshotRestore(stream coordv1.Coordinator_SnapshotRestoreServer) error {
	var buf bytes.Buffer
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if buf.Len()+len(m.Data) > maxRestore {
			return status.Errorf(codes.InvalidArgument, "snapshot larger than %d bytes: not a shoal snapshot", maxRestore)
		}
		buf.Write(m.Data)
	}
	var sv savedStore
	if err := json.Unmarshal(buf.Bytes(), &sv); err != nil || sv.Version != 1 || sv.Dump == nil {
		return status.Error(codes.InvalidArgument, "not a shoal snapshot (write one with `shoal operator snapshot save FILE`)")
	}
	for _, r := range sv.Dump.Deployments {
		if r == nil || r.Name == "" || r.Spec == nil {
			return status.Error(codes.InvalidArgument, "the snapshot holds a deployment without a name or spec: refused")
		}
	}
	for _, g := range sv.Dump.Groups {
		if g == nil || g.ID == "" {
			return status.Error(codes.InvalidArgument, "the snapshot holds a replica group without an id: refused")
		}
	}
	if !s.c.leading() {
		return s.forwardRestore(stream, buf.Bytes())
	}
	if err := s.c.snap.Restore(sv.Dump); err != nil {
		var nl *replicate.ErrNotLeader
		if errors.As(err, &nl) {
			return s.c.storeError(err)
		}
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	s.c.events.add("", "", "store restored from a snapshot saved by %s at index %d (%d deployment(s), %d group(s))", sv.SavedBy, sv.Index,
		len(sv.Dump.Deployments), len(sv.Dump.Groups))
	s.c.poke()
	return stream.SendAndClose(&coordv1.SnapshotRestoreResponse{Deployments: uint32(len(sv.Dump.Deployments)), Groups: uint32(len(sv.Dump.Groups))})
}

// forwardRestore hands a restore that reached a follower to the leader.
func (s *apiServer) forwardRestore(stream coordv1.Coordinator_SnapshotRestoreServer, b []byte) error {
	if md, _ := metadata.FromIncomingContext(stream.Context()); len(md.Get(forwardedKey)) > 0 {
		return status.Error(codes.Unavailable, "the coordinator leader changed while the restore was forwarded: try again")
	}
	conn, err := s.c.leaderConn()
	if err != nil {
		return err
	}
	ctx := metadata.AppendToOutgoingContext(stream.Context(), forwardedKey, s.c.cfg.NodeID)
	up, err := coordv1.NewCoordinatorClient(conn).SnapshotRestore(ctx)
	if err != nil {
		return leaderUnreachable(s.c.repl.Leader(), conn.Target(), err)
	}
	for len(b) > 0 {
		n := min(len(b), snapshotChunk)
		if err := up.Send(&coordv1.SnapshotChunk{Data: b[:n]}); err != nil {
			break // the leader's answer says why
		}
		b = b[n:]
	}
	resp, err := up.CloseAndRecv()
	if err != nil {
		return err
	}
	return stream.SendAndClose(resp)
}

// snapshotter saves and restores the whole store.
type snapshotter interface {
	Dump() (*store.Dump, uint64, error)
	Restore(*store.Dump) error
}

// localSnapshots are a single coordinator's.
type localSnapshots struct{ st *store.Store }

func (l localSnapshots) Dump() (*store.Dump, uint64, error) {
	d, err := l.st.Dump()
	return d, 0, err
}

func (l localSnapshots) Restore(d *store.Dump) error {
	if err := replicate.SameCluster(l.st, d); err != nil {
		return err
	}
	return l.st.Replace(d)
}

// raftMetrics export the server's Raft figures on each scrape.
type raftMetrics struct {
	c                                      *Coordinator
	leader, term, commit, applied, contact *prometheus.Desc
}

func newRaftMetrics(c *Coordinator) *raftMetrics {
	d := func(name, help string) *prometheus.Desc { return prometheus.NewDesc(name, help, nil, nil) }
	return &raftMetrics{c: c,
		leader:  d("shoal_coordinator_raft_leader", "1 while this coordinator leads the Raft group (a single coordinator: always)."),
		term:    d("shoal_coordinator_raft_term", "The Raft term this server is in."),
		commit:  d("shoal_coordinator_raft_commit_index", "The last Raft log index known committed."),
		applied: d("shoal_coordinator_raft_applied_index", "The last Raft log index applied to this server's store; commit − applied is the apply lag."),
		contact: d("shoal_coordinator_raft_last_contact_seconds", "Since this follower last heard from the leader (0 on the leader)."),
	}
}

func (m *raftMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.leader, m.term, m.commit, m.applied, m.contact} {
		ch <- d
	}
}

func (m *raftMetrics) Collect(ch chan<- prometheus.Metric) {
	g := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	c := m.c
	if c.repl == nil {
		g(m.leader, 1)
		return
	}
	st := c.repl.Stats()
	g(m.leader, map[bool]float64{true: 1}[c.repl.Leading()])
	g(m.term, float64(st.Term))
	g(m.commit, float64(st.CommitIndex))
	g(m.applied, float64(st.AppliedIndex))
	g(m.contact, st.LastContact.Seconds())
}
