package agent

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/shoalhq/shoal/gossip"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/security"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
)

// ReplicaService is the name grpc.health.v1 reports the replica under.
const ReplicaService = "shoal.replica.v1.Replica"

// replicaServer is the Replica API. It listens only while this node is head:
// on a worker, or a former head, the port is closed.
type replicaServer struct {
	tls  *security.TLS
	addr string
	log  *slog.Logger

	mu      sync.Mutex
	srv     *grpc.Server       // guarded by mu; nil when not head
	health  *health.Server     // guarded by mu
	latest  *replicav1.Metrics // guarded by mu
	changed chan struct{}      // guarded by mu; closed and replaced on every update
}

func newReplicaServer(addr string, log *slog.Logger, tl *security.TLS) *replicaServer {
	return &replicaServer{addr: addr, log: log.With("component", "replica-api"), changed: make(chan struct{}), latest: &replicav1.Metrics{}, tls: tl}
}

func (s *replicaServer) start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return
	}
	lis, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.log.Error("cannot serve replica api", "addr", s.addr, "err", err)
		return
	}
	s.srv = grpc.NewServer(s.tls.ServerOptions(security.ReplicaPolicy, false)...)
	s.health = health.NewServer()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	s.health.SetServingStatus(ReplicaService, healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(s.srv, s.health)
	replicav1.RegisterReplicaServer(s.srv, &replicaAPI{s: s})
	go func(srv *grpc.Server) { _ = srv.Serve(lis) }(s.srv)
	s.log.Info("replica api listening", "addr", s.addr)
}

func (s *replicaServer) stop() {
	s.mu.Lock()
	srv, h := s.srv, s.health
	s.srv, s.health = nil, nil
	s.latest = &replicav1.Metrics{}
	s.mu.Unlock()
	if srv == nil {
		return
	}
	h.Shutdown() // NOT_SERVING to watchers before the port closes
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Second):
		srv.Stop()
	}
}

// update publishes a new snapshot; serving follows m.Serving.
func (s *replicaServer) update(m *replicav1.Metrics) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil {
		return
	}
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if m.Serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	s.health.SetServingStatus("", st)
	s.health.SetServingStatus(ReplicaService, st)
	s.latest = m
	close(s.changed)
	s.changed = make(chan struct{})
}

// setServing flips readiness at once (failure: the router must drop the head now).
func (s *replicaServer) setServing(serving bool, reason string) {
	s.mu.Lock()
	m := proto.Clone(s.latest).(*replicav1.Metrics)
	s.mu.Unlock()
	m.Serving, m.Reason = serving, reason
	m.UnixMillis = time.Now().UnixMilli()
	s.update(m)
}

func (s *replicaServer) current() (*replicav1.Metrics, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.latest, s.changed
}

type replicaAPI struct {
	replicav1.UnimplementedReplicaServer
	s *replicaServer
}

func (r *replicaAPI) Snapshot(_ context.Context, _ *replicav1.SnapshotRequest) (*replicav1.Metrics, error) {
	m, _ := r.s.current()
	return m, nil
}

// Watch sends the snapshot at once, on every change, and at least every second.
func (r *replicaAPI) Watch(_ *replicav1.SnapshotRequest, stream replicav1.Replica_WatchServer) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		m, changed := r.s.current()
		if err := stream.Send(m); err != nil {
			return err
		}
		select {
		case <-stream.Context().Done():
			return nil
		case <-changed:
		case <-t.C:
		}
	}
}

// snapshot builds the Replica API message for the current run.
func (a *Agent) snapshot(as *Assignment, r *run, phase string) *replicav1.Metrics {
	m := &replicav1.Metrics{Deployment: as.Deployment, GroupId: as.Group, Epoch: as.Epoch, NodeId: a.cfg.NodeID,
		ServedModelName: as.Spec.Engine.ServedModelName, UnixMillis: time.Now().UnixMilli(), Reason: phase}
	a.mu.Lock()
	m.Term = a.claim
	a.mu.Unlock()
	if r == nil {
		return m
	}
	m.Endpoint = r.plan.Endpoint
	m.Serving = phase == gossip.EngineReady
	r.mu.Lock()
	ms := r.metrics
	r.mu.Unlock()
	if ms.have {
		m.NumRequestsRunning, m.NumRequestsWaiting, m.KvCacheUsage = ms.last.Running, ms.last.Waiting, ms.last.KVCacheUsage
		m.GenerationTokensPerSecond, m.TtftSecondsAvg, m.PrefixCacheHitRate = ms.tokPerS, ms.ttftAvg, ms.hitRate
		m.MetricsValid = true
	}
	return m
}
