package coordinator

import (
	"context"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// headKey names one head claim: the router only sends to the newest
// (group, epoch, term) it has seen.
type headKey struct {
	Node  string
	Group string
	Epoch uint64
	Term  uint64
}

type headInfo struct {
	Deployment string
	Addr       string
	// Complete is false while a member is missing from gossip: the replica
	// cannot serve (vLLM has lost a rank), whatever its head last said.
	Complete bool
}

type headState struct {
	info      headInfo
	cancel    context.CancelFunc
	latest    *replicav1.Metrics
	connected bool
}

// heads keeps one Replica API Watch stream per head claim.
type heads struct {
	log      *slog.Logger
	onChange func()

	mu sync.Mutex
	m  map[headKey]*headState // guarded by mu
}

func newHeads(log *slog.Logger, onChange func()) *heads {
	return &heads{log: log.With("component", "heads"), onChange: onChange, m: map[headKey]*headState{}}
}

// sync starts watchers for new heads and stops those no longer wanted.
func (h *heads) sync(want map[headKey]headInfo) {
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
		go h.watch(ctx, k, info.Addr)
		changed = true
	}
	h.mu.Unlock()
	if changed {
		h.onChange()
	}
}

func (h *heads) stopAll() { h.sync(nil) }

// watch follows one head's Replica stream, reconnecting until cancelled.
func (h *heads) watch(ctx context.Context, k headKey, addr string) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		h.log.Error("replica api address", "addr", addr, "err", err)
		return
	}
	defer conn.Close()
	cl := replicav1.NewReplicaClient(conn)
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

func (h *heads) set(k headKey, m *replicav1.Metrics, connected bool) {
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

// routable says whether a head may receive traffic now.
func (st *headState) routable() bool {
	return st.connected && st.info.Complete && st.latest != nil && st.latest.Serving && st.latest.Endpoint != ""
}

// newest returns, per group, the newest head state (highest epoch, then term).
func (h *heads) newest() map[string]struct {
	k  headKey
	st headState
} {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]struct {
		k  headKey
		st headState
	}{}
	for k, st := range h.m {
		cur, ok := out[k.Group]
		if !ok || k.Epoch > cur.k.Epoch || (k.Epoch == cur.k.Epoch && k.Term > cur.k.Term) {
			out[k.Group] = struct {
				k  headKey
				st headState
			}{k, *st}
		}
	}
	return out
}

func (h *heads) serving(group string) bool {
	n, ok := h.newest()[group]
	return ok && n.st.routable()
}

// replicaView is one group's head state, for status.
type replicaView struct {
	Key      headKey
	Info     headInfo
	Metrics  *replicav1.Metrics
	Routable bool
}

func (h *heads) views() map[string]replicaView {
	out := map[string]replicaView{}
	for g, n := range h.newest() {
		out[g] = replicaView{Key: n.k, Info: n.st.info, Metrics: n.st.latest, Routable: n.st.routable()}
	}
	return out
}

// rebuildTable publishes a new router snapshot from the heads' states.
func (c *Coordinator) rebuildTable() {
	var eps []*router.Endpoint
	for _, v := range c.heads.views() {
		if !v.Routable {
			continue
		}
		m := v.Metrics
		eps = append(eps, &router.Endpoint{Model: m.ServedModelName, Deployment: v.Info.Deployment, Group: v.Key.Group,
			Epoch: v.Key.Epoch, Term: v.Key.Term, NodeID: v.Key.Node, Addr: m.Endpoint,
			Running: m.NumRequestsRunning, Waiting: m.NumRequestsWaiting, KVCache: m.KvCacheUsage,
			TTFT: m.TtftSecondsAvg, TokPerSec: m.GenerationTokensPerSecond, HasMetrics: m.MetricsValid})
	}
	sort.Slice(eps, func(i, j int) bool { return eps[i].Group < eps[j].Group })
	c.mu.Lock()
	models := c.models
	c.mu.Unlock()
	c.table.Set(router.NewSnapshot(models, eps))
}
