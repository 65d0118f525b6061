package router

import (
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
)

// Endpoint is one SERVING replica head.
type Endpoint struct {
	Model      string
	Deployment string
	Group      string
	Epoch      uint64
	Term       uint64
	NodeID     string
	Addr       string // host:port of the engine's OpenAI server
	Running    float64
	Waiting    float64
	KVCache    float64 // 0-1
	TTFT       float64 // seconds, recent average; 0 when unknown
	TokPerSec  float64 // generation tokens/s, recent
	// HasMetrics is false until the head has reported engine metrics.
	HasMetrics bool
	// Retries is the deployment's router.retries: 0 the router's own, -1
	// none, n > 0 that many more attempts.
	Retries int
	// Rank is the DP rank this endpoint stands for, -1 for a whole replica
	// (a data-parallel group with hybrid or external load balancing is one
	// endpoint per rank); PinRank: requests carry X-data-parallel-rank.
	Rank    int
	PinRank bool
	// Role is prefill or decode for a disaggregated model's engines ("":
	// the engine serves requests whole).
	Role string
	// BootstrapPort is an SGLang prefill engine's bootstrap port on the
	// endpoint's host: the model speaks SGLang's protocol (the same body
	// to both engines at once), not vLLM's two hops.
	BootstrapPort int
	// SGLangPD: an SGLang disaggregated engine (a decode one serves only
	// requests that come with a prefill engine's bootstrap room).
	SGLangPD bool
	// AdapterSlots is how many LoRA adapters the engine holds (0: no
	// LoRA); AdaptersHeld how many it holds now; loras which (adapters.go).
	AdapterSlots int
	AdaptersHeld int
	loras        map[string]bool
	// catalog is the deployment's adapters (name → maxReplicas), as the
	// head reports them.
	catalog map[string]int
	id      string
}

// Loaded says whether the endpoint's engine holds the adapter now.
func (e *Endpoint) Loaded(adapter string) bool { return e.loras[adapter] }

// WithAdapters sets the adapters an endpoint's engine holds and its
// deployment's catalog (name → maxReplicas; tests and standalone tables).
func (e *Endpoint) WithAdapters(slots int, loaded []string, catalog map[string]int) *Endpoint {
	e.AdapterSlots, e.AdaptersHeld, e.catalog = slots, len(loaded), catalog
	e.loras = map[string]bool{}
	for _, n := range loaded {
		e.loras[n] = true
	}
	return e
}

// ID names the endpoint in the router's own bookkeeping (in-flight counts,
// prefix and session affinity): the address, and the rank when it pins one.
func (e *Endpoint) ID() string {
	if e.id != "" {
		return e.id
	}
	if e.PinRank {
		return e.Addr + "#" + strconv.Itoa(e.Rank)
	}
	return e.Addr
}

// Snapshot is an immutable view of the routable endpoints.
type Snapshot struct {
	byModel  map[string][]*Endpoint
	known    map[string]bool
	adapters map[string]adapterRoute // adapter → its base model (adapters.go)
}

// NewSnapshot builds a snapshot. models lists every served model name that
// exists (ready or not), so an unknown model can be told from an unready one.
func NewSnapshot(models []string, eps []*Endpoint) *Snapshot {
	s := &Snapshot{byModel: map[string][]*Endpoint{}, known: map[string]bool{}, adapters: map[string]adapterRoute{}}
	for _, m := range models {
		s.known[m] = true
	}
	for _, e := range eps {
		s.byModel[e.Model] = append(s.byModel[e.Model], e)
		s.known[e.Model] = true
		for n, bound := range e.catalog {
			s.adapters[n] = adapterRoute{base: e.Model, maxReplicas: bound}
		}
	}
	for _, l := range s.byModel {
		sort.Slice(l, func(i, j int) bool { return l[i].Addr < l[j].Addr })
	}
	return s
}

// Endpoints returns the model's endpoints and whether the model exists.
func (s *Snapshot) Endpoints(model string) ([]*Endpoint, bool) {
	return s.byModel[model], s.known[model]
}

// Ready lists the models with at least one endpoint, sorted.
func (s *Snapshot) Ready() []string {
	var out []string
	for m, l := range s.byModel {
		if len(l) > 0 {
			out = append(out, m)
		}
	}
	sort.Strings(out)
	return out
}

// Table holds the current snapshot.
type Table struct {
	p       atomic.Pointer[Snapshot]
	mu      sync.Mutex
	changed chan struct{} // guarded by mu; closed and replaced on every Set
}

// NewTable returns an empty table.
func NewTable() *Table {
	t := &Table{changed: make(chan struct{})}
	t.p.Store(NewSnapshot(nil, nil))
	return t
}

// Set replaces the snapshot.
func (t *Table) Set(s *Snapshot) {
	t.p.Store(s)
	t.mu.Lock()
	close(t.changed)
	t.changed = make(chan struct{})
	t.mu.Unlock()
}

// Changed is closed at the next Set (for requests held until a replica is ready).
func (t *Table) Changed() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.changed
}

// Load returns the current snapshot.
func (t *Table) Load() *Snapshot { return t.p.Load() }
