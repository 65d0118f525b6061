package router

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// LoRA adapters (docs/design/adapters.md §A5). A request whose model is an
// adapter goes to the replicas whose engine holds it, least loaded first.
// When none holds it, the router has the best replica (the fewest adapters,
// then the least load) load it and holds the request until it is loaded;
// when every holder queues while another replica is idle, it has one more
// replica load it (within the adapter's bound) and routes on meanwhile.

// AdapterLoader asks a replica's head to load an adapter (the watcher, over
// the head's Replica API).
type AdapterLoader interface {
	LoadAdapter(ctx context.Context, ep *Endpoint, name string) error
}

// Adapter routing modes (Config.AdapterRouting).
const (
	// AdapterAffinity: an adapter's requests go to the replicas that hold it.
	AdapterAffinity = "affinity"
	// AdapterLeastRequest: to the least loaded replica, which loads the
	// adapter when it lacks it (what a balancer unaware of adapters does
	// in front of engines that load on demand; the benchmark's peer).
	AdapterLeastRequest = "least-request"
)

// DefaultAdapterLoadTimeout bounds the wait for an adapter's load.
const DefaultAdapterLoadTimeout = 2 * time.Minute

// adapterRoute is an adapter as the table knows it.
type adapterRoute struct {
	base        string // the model it adapts
	maxReplicas int
}

// Adapter returns the adapter's base model and bound.
func (s *Snapshot) Adapter(name string) (base string, maxReplicas int, ok bool) {
	a, ok := s.adapters[name]
	if !ok {
		return "", 0, false
	}
	return a.base, a.maxReplicas, true
}

// Adapters lists the adapters of the ready models: name → base.
func (s *Snapshot) Adapters() map[string]string {
	out := map[string]string{}
	for n, a := range s.adapters {
		if len(s.byModel[a.base]) > 0 {
			out[n] = a.base
		}
	}
	return out
}

// load is an endpoint's load as adapter placement weighs it.
func load(e *Endpoint) float64 { return e.Running + 2*e.Waiting }

// adapterTargets orders the replicas that could load an adapter: the
// fewest adapters held, then the least load.
func adapterTargets(eps []*Endpoint, name string) []*Endpoint {
	var out []*Endpoint
	for _, e := range eps {
		if !e.Loaded(name) && e.AdapterSlots > 0 {
			out = append(out, e)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].AdaptersHeld != out[j].AdaptersHeld {
			return out[i].AdaptersHeld < out[j].AdaptersHeld
		}
		return load(out[i]) < load(out[j])
	})
	return out
}

type adapterMetrics struct {
	loads *prometheus.CounterVec
	wait  prometheus.Histogram
}

func newAdapterMetrics(reg *prometheus.Registry) *adapterMetrics {
	m := &adapterMetrics{
		loads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_adapter_loads_total",
			Help: "Adapter loads this router asked a replica for, by adapter, why (cold: no replica held it; spread: its replicas queued) and result."},
			[]string{"adapter", "why", "result"}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shoal_router_adapter_load_wait_seconds",
			Help: "How long requests were held for an adapter to load.", Buckets: prometheus.ExponentialBuckets(0.01, 2, 16)}),
	}
	reg.MustRegister(m.loads, m.wait)
	return m
}

// spreading dedups this router's background loads.
type spreading struct {
	mu sync.Mutex
	on map[string]bool // guarded by mu; adapter → a spread load is under way
}

func (s *spreading) start(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.on == nil {
		s.on = map[string]bool{}
	}
	if s.on[name] {
		return false
	}
	s.on[name] = true
	return true
}

func (s *spreading) end(name string) {
	s.mu.Lock()
	delete(s.on, name)
	s.mu.Unlock()
}

// errAdapter is an adapter request that cannot be served now: its HTTP
// status and message; noRoom: the replica asked had no free slot (the
// next may).
type errAdapter struct {
	status int
	msg    string
	noRoom bool
}

func (e *errAdapter) Error() string { return e.msg }

// adapterEndpoints narrows a base model's endpoints to those that serve the
// adapter now, loading it where needed.
func (r *Router) adapterEndpoints(ctx context.Context, name string, bound int, eps []*Endpoint) ([]*Endpoint, *errAdapter) {
	if len(eps) == 0 {
		return nil, nil // no replica of the base model: the usual 503 (or hold)
	}
	var holders []*Endpoint
	for _, e := range eps {
		if e.Loaded(name) {
			holders = append(holders, e)
		}
	}
	if r.cfg.AdapterRouting == AdapterLeastRequest {
		best := eps[0]
		for _, e := range eps[1:] {
			if load(e)+r.picker.inflightOf(e.ID()) < load(best)+r.picker.inflightOf(best.ID()) {
				best = e
			}
		}
		if best.Loaded(name) {
			return []*Endpoint{best}, nil
		}
		if err := r.loadAdapter(ctx, best, name, "cold"); err != nil {
			return nil, err
		}
		return []*Endpoint{best}, nil
	}
	if len(holders) > 0 {
		r.maybeSpread(name, bound, eps, holders)
		return holders, nil
	}
	var last *errAdapter
	for _, t := range adapterTargets(eps, name) {
		err := r.loadAdapter(ctx, t, name, "cold")
		if err == nil {
			return []*Endpoint{t}, nil
		}
		last = err
		if !err.noRoom {
			break // only a replica without room sends the router to the next
		}
	}
	if last == nil {
		last = &errAdapter{status: 503, msg: fmt.Sprintf("no replica of `%s` can load adapter `%s` (none runs with engine.lora)", eps[0].Model, name)}
	}
	return nil, last
}

// maybeSpread has one more replica load the adapter when every holder
// queues and a replica without it is idle, within its bound.
func (r *Router) maybeSpread(name string, bound int, eps, holders []*Endpoint) {
	if bound > 0 && len(holders) >= bound {
		return
	}
	minHeld := math.Inf(1)
	for _, h := range holders {
		minHeld = min(minHeld, load(h)+r.picker.inflightOf(h.ID()))
		if h.Waiting == 0 {
			return
		}
	}
	ts := adapterTargets(eps, name)
	if len(ts) == 0 || load(ts[0])+r.picker.inflightOf(ts[0].ID()) >= minHeld/2 || !r.spread.start(name) {
		return
	}
	t := ts[0]
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		defer r.spread.end(name)
		ctx, cancel := context.WithTimeout(r.bgCtx, r.cfg.AdapterLoadTimeout)
		defer cancel()
		_ = r.loadAdapter(ctx, t, name, "spread")
	}()
}

// loadAdapter asks ep's head to load the adapter and waits.
func (r *Router) loadAdapter(ctx context.Context, ep *Endpoint, name, why string) *errAdapter {
	if r.cfg.Adapters == nil {
		return &errAdapter{status: 503, msg: fmt.Sprintf("no replica holds adapter `%s`, and this router cannot ask one to load it", name)}
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.AdapterLoadTimeout)
	defer cancel()
	start := time.Now()
	err := r.cfg.Adapters.LoadAdapter(ctx, ep, name)
	if why == "cold" {
		r.am.wait.Observe(time.Since(start).Seconds())
	}
	result := "loaded"
	if err != nil {
		result = "failed"
	}
	r.am.loads.WithLabelValues(name, why, result).Inc()
	if err == nil {
		return nil
	}
	r.log.Warn("adapter load failed", "adapter", name, "replica", ep.Group, "err", err)
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.ResourceExhausted:
		return &errAdapter{status: 503, noRoom: true, msg: fmt.Sprintf("replica %s has no free slot for adapter `%s`: %s", ep.Group, name, st.Message())}
	case codes.NotFound:
		return &errAdapter{status: 404, msg: fmt.Sprintf("The model `%s` does not exist.", name)}
	case codes.DeadlineExceeded:
		return &errAdapter{status: 503, msg: fmt.Sprintf("adapter `%s` did not load on replica %s within %s; retry later", name, ep.Group, r.cfg.AdapterLoadTimeout)}
	}
	return &errAdapter{status: 503, msg: fmt.Sprintf("adapter `%s` could not be loaded on replica %s: %s", name, ep.Group, st.Message())}
}

// adapterCards are /v1/models entries for the adapters the table knows
// that no engine card listed (an adapter not loaded anywhere yet, or
// loaded beyond the engines asked).
func (r *Router) adapterCards(have map[string]bool) []map[string]any {
	ads := r.table.Load().Adapters()
	names := make([]string, 0, len(ads))
	for n := range ads {
		if !have[n] {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	out := make([]map[string]any, 0, len(names))
	for _, n := range names {
		out = append(out, map[string]any{"id": n, "object": "model", "created": 0, "owned_by": "vllm", "root": n, "parent": ads[n]})
	}
	return out
}

// adapterKey marks a request's context as an adapter's (its value the
// adapter): an engine's 404 then means the adapter left that engine.
type adapterKey struct{}
