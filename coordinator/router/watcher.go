package router

import (
	"context"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/shoalhq/shoal/gossip"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/security"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// HeadKey names one head claim: the router only sends to the newest
// (group, epoch, term) it has seen.
type HeadKey struct {
	Node  string
	Group string
	Epoch uint64
	Term  uint64
}

// HeadInfo is what the watcher knows of a head claim besides its reports.
type HeadInfo struct {
	Deployment string
	Addr       string
	// Complete is false while a member is missing from gossip: the replica
	// cannot serve (vLLM has lost a rank), whatever its head last said.
	Complete bool
	// Draining: the group is being scaled in (the coordinator's store or the
	// head's tag says so); it gets no new requests.
	Draining bool
}

type headState struct {
	info      HeadInfo
	client    replicav1.ReplicaClient // nil until the stream dialled
	cancel    context.CancelFunc
	latest    *replicav1.Metrics
	connected bool
}

// Watcher keeps one Replica API Watch stream per head claim and turns what
// the heads report into router snapshots. It runs off the hot path.
type Watcher struct {
	tls      *security.TLS
	log      *slog.Logger
	onChange func()
	kv       *KVIndex // the heads' KV events
	queues   *Queues  // this router's prefill queues and the other routers'

	mu sync.Mutex
	m  map[HeadKey]*headState // guarded by mu
	wg sync.WaitGroup         // the streams
}

// NewWatcher returns a watcher; onChange runs after every state change.
func NewWatcher(log *slog.Logger, onChange func(), tl *security.TLS) *Watcher {
	return &Watcher{tls: tl, log: log.With("component", "heads"), onChange: onChange, m: map[HeadKey]*headState{}, kv: NewKVIndex(0), queues: NewQueues()}
}

// KV is the index the watcher fills from the heads' KV events; give it to
// the router (Config.KV).
func (h *Watcher) KV() *KVIndex { return h.kv }

// Queues is the routers' shared prefill queues the watcher keeps with the
// heads; give it to the router (Config.Queues).
func (h *Watcher) Queues() *Queues { return h.queues }

// Sync starts watchers for new heads and stops those no longer wanted.
func (h *Watcher) Sync(want map[HeadKey]HeadInfo) {
	h.mu.Lock()
	changed := false
	for k, st := range h.m {
		info, ok := want[k]
		if !ok {
			st.cancel()
			delete(h.m, k)
			changed = true
			continue
		}
		if st.info != info {
			st.info = info
			changed = true
		}
	}
	for k, info := range want {
		if _, ok := h.m[k]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		h.m[k] = &headState{info: info, cancel: cancel}
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			h.watch(ctx, k, info.Addr)
		}()
		changed = true
	}
	h.mu.Unlock()
	if changed {
		h.onChange()
	}
}

// StopAll ends every stream and waits for them.
func (h *Watcher) StopAll() {
	h.Sync(nil)
	h.wg.Wait()
}

// watch follows one head's Replica stream, reconnecting until cancelled.
func (h *Watcher) watch(ctx context.Context, k HeadKey, addr string) {
	conn, err := h.tls.Dial(addr)
	if err != nil {
		h.log.Error("replica api address", "addr", addr, "err", err)
		return
	}
	defer conn.Close()
	cl := replicav1.NewReplicaClient(conn)
	h.mu.Lock()
	if st := h.m[k]; st != nil {
		st.client = cl
	}
	h.mu.Unlock()
	kvDone := make(chan struct{})
	go func() {
		defer close(kvDone)
		h.watchKV(ctx, cl, k)
	}()
	defer func() { <-kvDone }()
	queueDone := make(chan struct{})
	go func() {
		defer close(queueDone)
		h.watchQueue(ctx, cl, func() []string { return h.endpointIDs(k) })
	}()
	defer func() { <-queueDone }()
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		stream, err := cl.Watch(ctx, &replicav1.SnapshotRequest{})
		if err == nil {
			for {
				m, rerr := stream.Recv()
				if rerr != nil {
					err = rerr
					break
				}
				backoff = 200 * time.Millisecond
				h.set(k, m, true)
			}
		}
		h.set(k, nil, false)
		if ctx.Err() != nil {
			return
		}
		h.log.Debug("replica stream closed; reconnecting", "head", k.Node, "group", k.Group, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 3*time.Second)
	}
}

func (h *Watcher) set(k HeadKey, m *replicav1.Metrics, connected bool) {
	h.mu.Lock()
	st, ok := h.m[k]
	if ok {
		if m != nil {
			st.latest = m
		}
		st.connected = connected
	}
	h.mu.Unlock()
	if ok {
		h.onChange()
	}
}

// routable says whether a head may receive new requests now: connected,
// its group complete, serving, and not draining.
func (st *headState) routable() bool {
	return st.connected && st.info.Complete && !st.info.Draining && st.latest != nil && st.latest.Serving &&
		!st.latest.Draining && st.latest.Endpoint != ""
}

// newest returns, per group, the newest head state (highest epoch, then term).
func (h *Watcher) newest() map[string]struct {
	k  HeadKey
	st headState
} {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]struct {
		k  HeadKey
		st headState
	}{}
	for k, st := range h.m {
		cur, ok := out[k.Group]
		if !ok || k.Epoch > cur.k.Epoch || (k.Epoch == cur.k.Epoch && k.Term > cur.k.Term) {
			out[k.Group] = struct {
				k  HeadKey
				st headState
			}{k, *st}
		}
	}
	return out
}

// Serving says whether a group's newest head is routable.
func (h *Watcher) Serving(group string) bool {
	n, ok := h.newest()[group]
	return ok && n.st.routable()
}

// ReplicaView is one group's newest head state, for status.
type ReplicaView struct {
	Key      HeadKey
	Info     HeadInfo
	Metrics  *replicav1.Metrics
	Routable bool
	// Connected: the stream to the head is up (Metrics is current).
	Connected bool
}

// Views returns each group's newest head state.
func (h *Watcher) Views() map[string]ReplicaView {
	out := map[string]ReplicaView{}
	for g, n := range h.newest() {
		out[g] = ReplicaView{Key: n.k, Info: n.st.info, Metrics: n.st.latest, Routable: n.st.routable(), Connected: n.st.connected}
	}
	return out
}

// Snapshot builds a router snapshot from the routable heads. models lists
// the served names that exist (for 404 versus 503).
func (h *Watcher) Snapshot(models []string) *Snapshot {
	var eps []*Endpoint
	for _, v := range h.Views() {
		if !v.Routable {
			continue
		}
		eps = append(eps, endpointsOf(v)...)
	}
	sort.Slice(eps, func(i, j int) bool {
		if eps[i].Group != eps[j].Group {
			return eps[i].Group < eps[j].Group
		}
		return eps[i].Rank < eps[j].Rank
	})
	return NewSnapshot(models, eps)
}

// endpointsOf is a routable head as the router's table holds it: one
// endpoint, or one per DP rank when the head lists its group's ranks (each
// with its own load; the group serves, or fails, as a whole).
func endpointsOf(v ReplicaView) []*Endpoint {
	ep := endpointOf(v)
	if len(v.Metrics.Ranks) == 0 {
		return []*Endpoint{ep}
	}
	out := make([]*Endpoint, 0, len(v.Metrics.Ranks))
	for _, r := range v.Metrics.Ranks {
		if r.Endpoint == "" {
			continue
		}
		e := *ep
		e.Addr, e.Rank, e.PinRank = r.Endpoint, int(r.Rank), r.Pin
		e.Running, e.Waiting, e.KVCache = r.NumRequestsRunning, r.NumRequestsWaiting, r.KvCacheUsage
		e.id = e.ID()
		out = append(out, &e)
	}
	return out
}

// endpointOf is a routable head's one endpoint.
func endpointOf(v ReplicaView) *Endpoint {
	m := v.Metrics
	ep := &Endpoint{Model: m.ServedModelName, Deployment: v.Info.Deployment, Group: v.Key.Group,
		Epoch: v.Key.Epoch, Term: v.Key.Term, NodeID: v.Key.Node, Addr: m.Endpoint,
		Running: m.NumRequestsRunning, Waiting: m.NumRequestsWaiting, KVCache: m.KvCacheUsage,
		TTFT: m.TtftSecondsAvg, TokPerSec: m.GenerationTokensPerSecond, HasMetrics: m.MetricsValid, Rank: -1, Role: m.Role,
		BootstrapPort: int(m.BootstrapPort), SGLangPD: m.SglangDisaggregation}
	if m.AdapterSlots > 0 || len(m.Adapters) > 0 {
		var loaded []string
		cat := make(map[string]int, len(m.Adapters))
		for _, a := range m.Adapters {
			cat[a.Name] = int(a.MaxReplicas)
			if a.State == "loaded" {
				loaded = append(loaded, a.Name)
			}
		}
		ep.WithAdapters(int(m.AdapterSlots), loaded, cat)
	}
	if m.RouterRetries != nil {
		ep.Retries = -1 // router.retries: 0
		if n := int(*m.RouterRetries); n > 0 {
			ep.Retries = n
		}
	}
	return ep
}

// WantedFromGossip derives the heads to watch from gossip alone, for a router
// running without the coordinator's store: a member claiming head, with the
// group complete when every one of its Size members is live and healthy on
// the same group and epoch.
func WantedFromGossip(tags map[string]gossip.Tag) map[HeadKey]HeadInfo {
	type gk struct {
		group string
		epoch uint64
	}
	members := map[gk]int{}
	for _, t := range tags {
		if t.Kind == gossip.KindAgent && t.Group != "" && t.Healthy {
			members[gk{t.Group, t.Epoch}]++
		}
	}
	out := map[HeadKey]HeadInfo{}
	for _, t := range tags {
		if t.Kind != gossip.KindAgent || t.HeadTerm == 0 || t.Replica == "" {
			continue
		}
		k := HeadKey{Node: t.ID, Group: t.Group, Epoch: t.Epoch, Term: t.HeadTerm}
		out[k] = HeadInfo{Deployment: t.Deployment, Addr: t.Replica, Complete: t.Size > 0 && members[gk{t.Group, t.Epoch}] >= t.Size,
			Draining: t.Draining}
	}
	return out
}

// LoadAdapter asks the head of ep's replica to load an adapter (the
// router's AdapterLoader).
func (h *Watcher) LoadAdapter(ctx context.Context, ep *Endpoint, name string) error {
	h.mu.Lock()
	st := h.m[HeadKey{Node: ep.NodeID, Group: ep.Group, Epoch: ep.Epoch, Term: ep.Term}]
	var cl replicav1.ReplicaClient
	if st != nil {
		cl = st.client
	}
	h.mu.Unlock()
	if cl == nil {
		return status.Errorf(codes.Unavailable, "replica %s: its head's Replica API is not connected", ep.Group)
	}
	_, err := cl.LoadAdapter(ctx, &replicav1.LoadAdapterRequest{Name: name})
	return err
}
