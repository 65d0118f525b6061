package router

import (
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Strategies a request may ask for in the routing-strategy header.
const (
	StrategyRandom       = "random"
	StrategyRoundRobin   = "round-robin"
	StrategyLeastRequest = "least-request"
	StrategyLeastKV      = "least-kv-cache"
	StrategyLeastLatency = "least-latency"
	StrategyThroughput   = "throughput"
	StrategyPrefixCache  = "prefix-cache"
	StrategyPrefixAIBrix = "prefix-cache-aibrix"
	StrategySession      = "session"
)

// DefaultStrategy is used when the header is absent.
const DefaultStrategy = StrategyLeastRequest

// Strategies lists the supported strategies.
var Strategies = []string{StrategyRandom, StrategyRoundRobin, StrategyLeastRequest, StrategyLeastKV, StrategyLeastLatency,
	StrategyThroughput, StrategyPrefixCache, StrategyPrefixAIBrix, StrategySession}

func validStrategy(s string) bool { return slices.Contains(Strategies, s) }

func strategyList() string { return strings.Join(Strategies, ", ") }

// hint is what a strategy may look at in the request.
type hint struct {
	model   string
	prefix  []uint64 // chained block hashes of the prompt's first PrefixBytes
	session string
}

// picker holds the state strategies share. Picks run under mu so that a pick
// and the increment of the chosen backend's in-flight count are one step:
// concurrent requests see each other and do not pile onto one replica.
type picker struct {
	mu       sync.Mutex
	inflight map[string]*atomic.Int64 // guarded by mu (the map; counters are atomic)
	rr       map[string]uint64        // guarded by mu; round-robin position per model
	ejected  map[string]time.Time     // guarded by mu; backend → until
	outliers map[string]*outlier      // guarded by mu; failure streaks and ejections
	prefix   *prefixIndex             // guarded by mu
	sessions *lru                     // guarded by mu; session id → backend
	now      func() time.Time
}

func newPicker() *picker {
	return &picker{inflight: map[string]*atomic.Int64{}, rr: map[string]uint64{}, ejected: map[string]time.Time{},
		outliers: map[string]*outlier{},
		prefix:   newPrefixIndex(200_000), sessions: newLRU(100_000), now: time.Now}
}

func (p *picker) counter(addr string) *atomic.Int64 {
	c, ok := p.inflight[addr]
	if !ok {
		c = &atomic.Int64{}
		p.inflight[addr] = c
	}
	return c
}

// load ranks backends: this router's open requests first (exact and
// current), then what the head reports (running + waiting, which includes
// other routers' requests but is up to a second old) as a fraction that only
// breaks ties. Taking the larger of the two let stale reports skew picks:
// 8 % below round-robin on a low-sharing workload (bench/routing).
func (p *picker) load(e *Endpoint) float64 {
	return float64(p.counter(e.Addr).Load()) + (e.Running+e.Waiting)/1e6
}

// eject keeps a failing backend out of picks for d.
func (p *picker) eject(addr string, d time.Duration) {
	p.mu.Lock()
	p.ejected[addr] = p.now().Add(d)
	p.mu.Unlock()
}

// pick chooses a backend and counts a request against it. It returns the
// endpoint (nil when none), the strategy actually applied, and a release func.
func (p *picker) pick(strategy string, eps []*Endpoint, h hint, exclude map[string]bool) (*Endpoint, string, func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	var cands, ejected []*Endpoint
	for _, e := range eps {
		if exclude[e.Addr] {
			continue
		}
		if until, ok := p.ejected[e.Addr]; ok && now.Before(until) {
			ejected = append(ejected, e)
			continue
		}
		cands = append(cands, e)
	}
	if len(cands) == 0 {
		cands = ejected // all ejected: better a suspect replica than none
	}
	if len(cands) == 0 {
		return nil, strategy, func() {}
	}
	e, used := p.choose(strategy, cands, h)
	c := p.counter(e.Addr)
	c.Add(1)
	if strategy == StrategyPrefixCache || strategy == StrategyPrefixAIBrix {
		p.prefix.add(h.prefix, e.Addr)
	}
	if h.session != "" {
		p.sessions.put(h.session, e.Addr)
	}
	return e, used, func() { c.Add(-1) }
}

// choose applies a strategy to candidates. Called with mu held.
func (p *picker) choose(strategy string, cands []*Endpoint, h hint) (*Endpoint, string) {
	switch strategy {
	case StrategyRandom:
		return cands[rand.IntN(len(cands))], strategy
	case StrategyRoundRobin:
		i := p.rr[h.model]
		p.rr[h.model] = i + 1
		return cands[i%uint64(len(cands))], strategy
	case StrategyLeastKV:
		return p.byMetric(strategy, cands, func(e *Endpoint) (float64, bool) { return e.KVCache, e.HasMetrics })
	case StrategyLeastLatency:
		// Expected wait: recent TTFT scaled by the queue it would join.
		return p.byMetric(strategy, cands, func(e *Endpoint) (float64, bool) {
			return e.TTFT * (1 + e.Waiting), e.HasMetrics && e.TTFT > 0
		})
	case StrategyThroughput:
		return p.byMetric(strategy, cands, func(e *Endpoint) (float64, bool) { return e.TokPerSec, e.HasMetrics })
	case StrategyPrefixCache:
		return p.prefixBounded(cands, h), strategy
	case StrategyPrefixAIBrix:
		if e := p.prefixAIBrix(cands, h); e != nil {
			return e, strategy
		}
		return p.leastRequest(cands), StrategyLeastRequest
	case StrategySession:
		if h.session != "" {
			if addr, ok := p.sessions.get(h.session); ok {
				for _, e := range cands {
					if e.Addr == addr {
						return e, strategy
					}
				}
			}
		}
		return p.leastRequest(cands), strategy
	default:
		return p.leastRequest(cands), StrategyLeastRequest
	}
}

// leastRequest: the lowest load, random among equals.
func (p *picker) leastRequest(cands []*Endpoint) *Endpoint {
	best, n := math.Inf(1), 0
	var pick *Endpoint
	for _, e := range cands {
		l := p.load(e)
		switch {
		case l < best:
			best, pick, n = l, e, 1
		case l == best:
			n++
			if rand.IntN(n) == 0 { // reservoir: uniform among ties
				pick = e
			}
		}
	}
	return pick
}

// byMetric picks the lowest score; without the metric anywhere it falls back
// to least-request (never silently to random) and says so.
func (p *picker) byMetric(strategy string, cands []*Endpoint, score func(*Endpoint) (float64, bool)) (*Endpoint, string) {
	var with []*Endpoint
	for _, e := range cands {
		if _, ok := score(e); ok {
			with = append(with, e)
		}
	}
	if len(with) == 0 {
		return p.leastRequest(cands), StrategyLeastRequest
	}
	sort.SliceStable(with, func(i, j int) bool {
		si, _ := score(with[i])
		sj, _ := score(with[j])
		if si != sj {
			return si < sj
		}
		return p.load(with[i]) < p.load(with[j])
	})
	return with[0], strategy
}

// prefixBounded sends a request where its prefix is cached, unless that
// replica is over a bounded share of the load (consistent hashing with bounded
// loads): then the next-best match, then least-request. A hot prefix spreads
// instead of melting one replica.
func (p *picker) prefixBounded(cands []*Endpoint, h hint) *Endpoint {
	total := 0.0
	for _, e := range cands {
		total += p.load(e)
	}
	limit := 1.25*total/float64(len(cands)) + 2
	type m struct {
		e     *Endpoint
		match int
	}
	var ms []m
	for _, e := range cands {
		if k := p.prefix.match(h.prefix, e.Addr); k > 0 {
			ms = append(ms, m{e, k})
		}
	}
	sort.SliceStable(ms, func(i, j int) bool {
		if ms[i].match != ms[j].match {
			return ms[i].match > ms[j].match
		}
		return p.load(ms[i].e) < p.load(ms[j].e)
	})
	for _, x := range ms {
		if p.load(x.e) < limit {
			return x.e
		}
	}
	return p.leastRequest(cands)
}

// prefixAIBrix is AIBrix's published prefix-cache rule (docs/design/figures.md §F3):
// least-request when max−min running > 16; else the best match whose running
// count is ≤ mean + 2σ; nil when none qualifies.
func (p *picker) prefixAIBrix(cands []*Endpoint, h hint) *Endpoint {
	lo, hi, sum, sq := math.Inf(1), math.Inf(-1), 0.0, 0.0
	for _, e := range cands {
		l := float64(p.counter(e.Addr).Load())
		lo, hi, sum, sq = math.Min(lo, l), math.Max(hi, l), sum+l, sq+l*l
	}
	if hi-lo > 16 {
		return nil
	}
	n := float64(len(cands))
	mean := sum / n
	bound := mean + 2*math.Sqrt(math.Max(0, sq/n-mean*mean))
	type m struct {
		e     *Endpoint
		match int
	}
	var ms []m
	for _, e := range cands {
		ms = append(ms, m{e, p.prefix.match(h.prefix, e.Addr)})
	}
	sort.SliceStable(ms, func(i, j int) bool {
		if ms[i].match != ms[j].match {
			return ms[i].match > ms[j].match
		}
		return p.counter(ms[i].e.Addr).Load() < p.counter(ms[j].e.Addr).Load()
	})
	for _, x := range ms {
		if float64(p.counter(x.e.Addr).Load()) <= bound {
			return x.e
		}
	}
	return nil
}
