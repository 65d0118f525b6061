package agent

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/shoalhq/shoal/agent/adapters"
	"github.com/shoalhq/shoal/agent/kvrelay"
	"github.com/shoalhq/shoal/agent/queueboard"
	"github.com/shoalhq/shoal/gossip"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/security"
	"github.com/shoalhq/shoal/spec"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// ReplicaService is the name grpc.health.v1 reports the replica under.
const ReplicaService = "shoal.replica.v1.Replica"

// replicaPublisher is what the supervisor does with the Replica API: open
// it when this node claims head, publish each snapshot, close it on a
// retract (never waiting), and wait for closed servers at exit.
type replicaPublisher interface {
	start()
	update(m *replicav1.Metrics, kv *kvrelay.Relay, ad adapterLoader)
	stop()
	wait()
}

// replicaServer is the Replica API. It listens only while this node is head:
// on a worker, or a former head, the port is closed.
type replicaServer struct {
	tls  *security.TLS
	addr string
	log  *slog.Logger

	mu      sync.Mutex
	srv     *grpc.Server       // guarded by mu; nil when not head
	lis     net.Listener       // guarded by mu
	health  *health.Server     // guarded by mu
	latest  *replicav1.Metrics // guarded by mu
	kv      *kvrelay.Relay     // guarded by mu; the current run's KV events, nil when none
	ad      adapterLoader      // guarded by mu; the current run's adapters, nil when none
	changed chan struct{}      // guarded by mu; closed and replaced on every update
	// stopping counts the servers still shutting down (stop never waits).
	stopping sync.WaitGroup
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
	s.lis = lis
	s.srv = grpc.NewServer(s.tls.ServerOptions(security.ReplicaPolicy, false)...)
	s.health = health.NewServer()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	s.health.SetServingStatus(ReplicaService, healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(s.srv, s.health)
	replicav1.RegisterReplicaServer(s.srv, &replicaAPI{s: s, queues: queueboard.New()})
	go func(srv *grpc.Server) { _ = srv.Serve(lis) }(s.srv)
	s.log.Info("replica api listening", "addr", s.addr)
}

// stop closes the Replica API: watchers hear NOT_SERVING and the port is
// free again at once; the server's streams end in the background (wait).
func (s *replicaServer) stop() {
	s.mu.Lock()
	srv, h, lis := s.srv, s.health, s.lis
	s.srv, s.health, s.lis = nil, nil, nil
	s.latest, s.kv, s.ad = &replicav1.Metrics{}, nil, nil
	s.mu.Unlock()
	if srv == nil {
		return
	}
	h.Shutdown() // NOT_SERVING to watchers before the port closes
	_ = lis.Close()
	s.stopping.Add(1)
	go func() {
		defer s.stopping.Done()
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(time.Second):
			srv.Stop()
			<-done
		}
	}()
}

// wait returns once every stopped server has shut down.
func (s *replicaServer) wait() { s.stopping.Wait() }

// update publishes a new snapshot; serving follows m.Serving. kv is the
// current run's KV-event relay, ad its adapters (nil: none).
func (s *replicaServer) update(m *replicav1.Metrics, kv *kvrelay.Relay, ad adapterLoader) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil {
		return
	}
	s.kv, s.ad = kv, ad
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

func (s *replicaServer) current() (*replicav1.Metrics, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.latest, s.changed
}

func (s *replicaServer) currentAdapters() adapterLoader {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ad
}

func (s *replicaServer) currentKV() *kvrelay.Relay {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.kv
}

type replicaAPI struct {
	replicav1.UnimplementedReplicaServer
	s      *replicaServer
	queues *queueboard.Board // the routers' prefill queues at this replica
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

// LoadAdapter loads an adapter of the deployment on this replica's engine
// and answers once it serves it (or why it cannot).
func (r *replicaAPI) LoadAdapter(ctx context.Context, req *replicav1.LoadAdapterRequest) (*replicav1.LoadAdapterResponse, error) {
	ad := r.s.currentAdapters()
	if ad == nil {
		return nil, status.Error(codes.Unavailable, "this replica's engine is not serving, or runs without engine.lora")
	}
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name the adapter")
	}
	return &replicav1.LoadAdapterResponse{}, adapters.StatusError(ad.Load(ctx, req.GetName()))
}

// Queue shares the routers' prefill queues at this replica (queueboard.Serve).
func (r *replicaAPI) Queue(stream replicav1.Replica_QueueServer) error {
	return queueboard.Serve(r.queues, stream)
}

// kvSnapshotChunk bounds the blocks in one KVEvents message (9 bytes each on
// the wire: well under gRPC's 4 MiB default).
const kvSnapshotChunk = 64 << 10

// KVEvents streams the engine's KV-cache blocks: a snapshot, then each
// change, numbered from 1 without gaps. A stream that falls a buffer behind
// is ended (RESOURCE_EXHAUSTED), one whose run ends too (UNAVAILABLE); the
// router reconnects and starts from a snapshot.
func (r *replicaAPI) KVEvents(_ *replicav1.KVEventsRequest, stream replicav1.Replica_KVEventsServer) error {
	kv := r.s.currentKV()
	if kv == nil {
		return status.Error(codes.Unavailable, "this replica's engine publishes no KV events (see engine.kvEvents)")
	}
	snap, changes, overrun, cancel := kv.Subscribe()
	defer cancel()
	var seq uint64
	send := func(m *replicav1.KVEventsMessage) error {
		seq++
		m.Seq = seq
		return stream.Send(m)
	}
	sendSnapshot := func(sn *kvrelay.Snapshot) error {
		blocks := sn.Blocks
		for first := true; first || len(blocks) > 0; first = false {
			n := min(len(blocks), kvSnapshotChunk)
			m := &replicav1.KVEventsMessage{Snapshot: true, More: n < len(blocks), Blocks: blocks[:n]}
			if first {
				m.HashAlgo, m.HashSeed, m.BlockSize, m.Endpoint = sn.Info.Algo, sn.Info.Seed, uint32(sn.Info.BlockSize), sn.Info.Endpoint
			}
			if err := send(m); err != nil {
				return err
			}
			blocks = blocks[n:]
		}
		return nil
	}
	if err := sendSnapshot(snap); err != nil {
		return err
	}
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case c, ok := <-changes:
			if !ok {
				if overrun() {
					return status.Error(codes.ResourceExhausted, "fell behind the engine's KV events; reconnect for a snapshot")
				}
				return status.Error(codes.Unavailable, "the engine run ended")
			}
			var err error
			if c.Reset != nil {
				err = sendSnapshot(c.Reset)
			} else {
				err = send(&replicav1.KVEventsMessage{Events: replicav1.EventsToProto(c.Events)})
			}
			if err != nil {
				return err
			}
		}
	}
}

// snapshot builds the Replica API message for the current run. Loop only.
func (a *Agent) snapshot() *replicav1.Metrics {
	as, l := a.loc.As, a.loc
	m := &replicav1.Metrics{Deployment: as.Deployment, GroupId: as.Group, Epoch: as.Epoch, NodeId: a.cfg.NodeID, Term: l.Claim,
		ServedModelName: as.Spec.Engine.ServedModelName, UnixMillis: time.Now().UnixMilli(), Reason: l.ES, Draining: l.Draining}
	if l.ES == gossip.EngineFailed {
		m.Reason, m.Failed = l.Msg, true
	}
	if r := as.Spec.Router; r != nil && r.Retries != nil {
		m.RouterRetries = proto.Int32(int32(*r.Retries))
	}
	if k := as.Spec.Engine.KVTransfer; k != nil {
		m.Role, m.BootstrapPort = k.Role, uint32(k.BootstrapPort)
		m.SglangDisaggregation = as.Spec.Engine.Kind == spec.EngineSGLang
	}
	a.adapterReport(m)
	if a.run == nil {
		return m
	}
	m.Endpoint = a.run.plan.Endpoint
	st := a.run.r.Status()
	m.Serving = l.ES == gossip.EngineReady && st.Phase == gossip.EngineReady && st.Failed == "" && !st.Stopping
	if ms := st.Metrics; ms.Have {
		m.NumRequestsRunning, m.NumRequestsWaiting, m.KvCacheUsage = ms.Running, ms.Waiting, ms.KVCache
		m.GenerationTokensPerSecond, m.TtftSecondsAvg, m.PrefixCacheHitRate = ms.TokensPerSecond, ms.TTFTAvg, ms.PrefixHitRate
		m.MetricsValid = true
		for _, r := range ms.Ranks {
			m.Ranks = append(m.Ranks, &replicav1.Rank{Rank: int32(r.Rank), Endpoint: r.Addr, Pin: r.Pin,
				NumRequestsRunning: r.Running, NumRequestsWaiting: r.Waiting, KvCacheUsage: r.KVCache})
		}
	}
	return m
}
