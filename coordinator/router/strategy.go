package router

import (
	"container/list"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoalhq/shoal/internal/kvhash"
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
	// tokens are the prompt's token ids as the engine tokenizes them (nil
	// when not known); promptTokens their count, or an estimate without them.
	tokens       []uint32
	promptTokens int
	keys         map[kvhash.Namer][]uint64 // tokens' block names, per naming rule (filled as needed)
	// mayWait: the caller can hold the request at the router, so
	// prefix-cache may answer "wait" (no replica) for a prompt cached
	// nowhere (hold.go); behind: requests are waiting ahead of this one.
	mayWait, behind bool
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
	pending  map[string]int           // guarded by mu; prefill tokens in flight per backend (prefix-cache)
	queues   *Queues                  // what other routers have queued (nil: none shared); a leaf lock under mu
	kv       *KVIndex                 // the engines' own KV events; nil: none
	rnd      *rand.Rand               // guarded by mu
	now      func() time.Time
	// holdTokens: with prefix-cache, a prompt cached nowhere waits while
	// every replica has at least this many of this router's prefill tokens
	// queued (0: never); waiting holds those requests, first come first
	// served (hold.go).
	holdTokens int
	waiting    *list.List // guarded by mu; of *waiter
	// prefilling: leases whose prefill is counted in pending, by engine
	// address and the name of their prompt's last full block: when the
	// engine's KV events report that block stored, the prefill is done
	// (a non-streamed answer's first byte comes only at its end).
	prefilling map[string]map[uint64][]*lease // guarded by mu
}

func newPicker() *picker {
	return newPickerWith(time.Now, rand.Uint64(), nil, nil)
}

func newPickerWith(now func() time.Time, seed uint64, kv *KVIndex, queues *Queues) *picker {
	p := &picker{inflight: map[string]*atomic.Int64{}, rr: map[string]uint64{}, ejected: map[string]time.Time{},
		outliers: map[string]*outlier{}, pending: map[string]int{}, queues: queues, kv: kv, rnd: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		prefix: newPrefixIndex(200_000), sessions: newLRU(100_000), now: now, waiting: list.New(),
		prefilling: map[string]map[uint64][]*lease{}}
	if kv != nil {
		kv.OnStored(p.stored)
	}
	return p
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
	return float64(p.counter(e.ID()).Load()) + (e.Running+e.Waiting)/1e6
}

// inflightOf is this router's open requests at the backend.
func (p *picker) inflightOf(id string) float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return float64(p.counter(id).Load())
}

// eject keeps a failing backend out of picks for d.
func (p *picker) eject(addr string, d time.Duration) {
	p.mu.Lock()
	p.ejected[addr] = p.now().Add(d)
	p.mu.Unlock()
}

// pick chooses a backend and counts a request against it. It returns the
// endpoint (nil when none), the strategy actually applied, and its lease.
func (p *picker) pick(strategy string, eps []*Endpoint, h hint, exclude map[string]bool) (*Endpoint, string, *lease) {
	p.mu.Lock()
	defer p.mu.Unlock()
	h.mayWait = false
	e, used, l, _ := p.pickLocked(strategy, eps, h, exclude)
	return e, used, l
}

// pickLocked is pick with mu held; held says the request must wait for
// room (only when h.mayWait), as opposed to having no candidate at all.
func (p *picker) pickLocked(strategy string, eps []*Endpoint, h hint, exclude map[string]bool) (*Endpoint, string, *lease, bool) {
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
		return nil, strategy, nil, false
	}
	e, used := p.choose(strategy, cands, h)
	if e == nil {
		return nil, used, nil, true
	}
	id := e.ID()
	c := p.counter(id)
	c.Add(1)
	work, hit := 0, 0
	if strategy == StrategyPrefixCache || strategy == StrategyPrefixAIBrix {
		p.prefix.add(h.prefix, id)
	}
	if strategy == StrategyPrefixCache {
		hit = p.hitTokens(e, h)
		work = max(0, h.promptTokens-hit)
		p.pending[id] += work
		p.queues.setOwn(id, p.pending[id])
	}
	if h.session != "" {
		p.sessions.put(h.session, id)
	}
	l := &lease{p: p, addr: id, c: c, work: work}
	if work > 0 {
		l.open.Store(true)
		p.awaitStored(l, e, h, hit)
	}
	return e, used, l, false
}

// awaitStored files l under its prompt's last full block on e's engine,
// when that engine sends KV events and the block is not stored yet: its
// store ends l's prefill (stored). hit is the prompt's tokens e holds.
// Called with mu held.
func (p *picker) awaitStored(l *lease, e *Endpoint, h hint, hit int) {
	if !p.fromEvents(e, h) {
		return
	}
	hs, _ := p.kv.Hasher(e.Addr)
	keys, named := h.keys[*hs]
	if !named {
		keys = hs.Keys(h.tokens, "")
	}
	if len(keys) == 0 {
		return // shorter than a block: only the first token says
	}
	if hit >= len(keys)*hs.Block() {
		return // all stored already: no event will say it again
	}
	last := keys[len(keys)-1]
	m := p.prefilling[e.Addr]
	if m == nil {
		m = map[uint64][]*lease{}
		p.prefilling[e.Addr] = m
	}
	m[last] = append(m[last], l)
	l.kvAddr, l.lastBlock = e.Addr, last
}

// stored: addr's engine reports blocks stored; the leases waiting on one of
// them have had their prompt prefilled.
func (p *picker) stored(addr string, blocks []uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.prefilling[addr]
	if len(m) == 0 {
		return
	}
	for _, b := range blocks {
		ls, ok := m[b]
		if !ok {
			continue
		}
		delete(m, b)
		for _, l := range ls {
			l.kvAddr = "" // out of prefilling already
			p.countOffLocked(l)
		}
	}
	if len(m) == 0 {
		delete(p.prefilling, addr)
	}
}

// countOffLocked ends l's prefill: its tokens leave its backend's queue,
// and the first waiting request may now fit. Called with mu held.
func (p *picker) countOffLocked(l *lease) {
	if l.work == 0 {
		return
	}
	if p.pending[l.addr] -= l.work; p.pending[l.addr] <= 0 {
		delete(p.pending, l.addr)
	}
	p.queues.setOwn(l.addr, p.pending[l.addr])
	l.work = 0
	l.open.Store(false)
	if l.kvAddr != "" {
		m := p.prefilling[l.kvAddr]
		m[l.lastBlock] = slices.DeleteFunc(m[l.lastBlock], func(x *lease) bool { return x == l })
		if len(m[l.lastBlock]) == 0 {
			delete(m, l.lastBlock)
		}
		if len(m) == 0 {
			delete(p.prefilling, l.kvAddr)
		}
		l.kvAddr = ""
	}
	p.wakeFront() // a prefill queue is shorter: the first waiting request may fit
}

// lease is one request's hold on a backend: its place in the in-flight count
// until done, and its prefill tokens in the prefix-cost queue until its
// first token or its engine's report of the prompt's blocks stored,
// whichever comes first (the prefill is then behind it).
type lease struct {
	p    *picker
	addr string
	c    *atomic.Int64
	work int         // guarded by p.mu; prefill tokens still counted, 0 once counted off
	open atomic.Bool // work > 0 (read without the lock on the hot path)
	// kvAddr and lastBlock file the lease in p.prefilling ("": not filed).
	kvAddr    string // guarded by p.mu
	lastBlock uint64 // guarded by p.mu
	done      bool
}

// firstToken: the backend has prefilled the request. Safe to call more than
// once, and on a nil lease (no backend was picked).
func (l *lease) firstToken() {
	if l == nil || !l.open.Load() {
		return
	}
	l.p.mu.Lock()
	l.p.countOffLocked(l)
	l.p.mu.Unlock()
}

// release ends the lease (once).
func (l *lease) release() {
	if l == nil || l.done {
		return
	}
	l.firstToken()
	l.done = true
	l.c.Add(-1)
}

// choose applies a strategy to candidates. Called with mu held.
func (p *picker) choose(strategy string, cands []*Endpoint, h hint) (*Endpoint, string) {
	switch strategy {
	case StrategyRandom:
		return cands[p.rnd.IntN(len(cands))], strategy
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
		return p.prefixCost(cands, h), strategy
	case StrategyPrefixAIBrix:
		if e := p.prefixAIBrix(cands, h); e != nil {
			return e, strategy
		}
		return p.leastRequest(cands), StrategyLeastRequest
	case StrategySession:
		if h.session != "" {
			if addr, ok := p.sessions.get(h.session); ok {
				for _, e := range cands {
					if e.ID() == addr {
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
			if p.rnd.IntN(n) == 0 { // reservoir: uniform among ties
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

// prefixCost is the prefix-aware rule (docs/design/kv-events.md §4):
//
//	cost(c) = 4·(P − hit(c)) + queued(c); the lowest wins, ties take turns.
//	A prompt cached nowhere takes turns among replicas with queued(c) ≤ min + 16·P,
//	and waits at the router while every queued(c) ≥ H (4,096 tokens; hold.go).
//
// P is the prompt's tokens, hit(c) how many of them replica c already holds
// in its KV cache, queued(c) the prefill tokens this router has sent c that
// are not prefilled yet (no first token, and c's engine has not reported
// the prompt's last full block stored). So a request goes to its cached
// prefix unless that replica's prefill queue is longer than four times what
// the prefix saves. The 4 prices a miss beyond its own prefill: the blocks it
// writes evict other prefixes that later requests must recompute (with 1,
// shared-prefix p90 TTFT was 5× worse in bench/routing; 4 and 8 measured the
// same). A prompt that no replica holds goes round-robin, which spaces each
// replica's arrivals evenly (least-queued was up to 13 % worse at p99 on the
// low-sharing workload), skipping stragglers; when every replica already has
// H queued it waits for the first to prefill one (only when h.mayWait: the
// caller holds it, and only when every replica's KV events say it is a
// miss: the history's estimates overstate the queues and held requests that
// had room), so no engine's queue grows past what it prefills in a step or
// two and the queue that remains is one, first come first served.
// hit(c) comes from c's engine's own KV events; for a replica that sends
// none it is estimated from where this router sent which prefix (the
// text-block history). It returns nil when the request must wait.
func (p *picker) prefixCost(cands []*Endpoint, h hint) *Endpoint {
	const missWeight, missSpread = 4, 16
	best, least := math.MaxInt, math.MaxInt
	anyHit, exact := false, true
	costs, queued := make([]int, len(cands)), make([]int, len(cands))
	others := p.queues.othersAtEach(cands)
	for i, e := range cands {
		hit := p.hitTokens(e, h)
		anyHit = anyHit || hit > 0
		exact = exact && p.fromEvents(e, h)
		queued[i] = p.pending[e.ID()]
		if others != nil {
			queued[i] += others[i]
		}
		costs[i] = missWeight*max(0, h.promptTokens-hit) + queued[i]
		best, least = min(best, costs[i]), min(least, queued[i])
	}
	if h.mayWait && !anyHit && exact && p.holdTokens > 0 && (h.behind || least >= p.holdTokens) {
		return nil
	}
	var ties []*Endpoint
	for i, e := range cands {
		if costs[i] == best || (!anyHit && queued[i] <= least+missSpread*h.promptTokens) {
			ties = append(ties, e)
		}
	}
	if len(ties) == 1 {
		return ties[0]
	}
	i := p.rr[h.model]
	p.rr[h.model] = i + 1
	return ties[i%uint64(len(ties))]
}

// nameBlocks names the prompt's blocks for every naming rule among eps'
// replicas (there is usually one), before the pick: hashing a long prompt
// takes a fraction of a millisecond, which must not be spent under the
// picker's lock.
func (h *hint) nameBlocks(kv *KVIndex, eps []*Endpoint) {
	if kv == nil || h.tokens == nil {
		return
	}
	if h.keys == nil {
		h.keys = map[kvhash.Namer][]uint64{}
	}
	for _, e := range eps {
		if hs, ok := kv.Hasher(e.Addr); ok {
			if _, done := h.keys[*hs]; !done {
				h.keys[*hs] = hs.Keys(h.tokens, "") // plain text: no adapter names yet (issue 24)
			}
		}
	}
}

// fromEvents: replica e's hits for h come from its engine's KV events (so a
// miss is known to be one), not from this router's history.
func (p *picker) fromEvents(e *Endpoint, h hint) bool {
	if p.kv == nil || h.tokens == nil {
		return false
	}
	_, ok := p.kv.Hasher(e.Addr)
	return ok
}

// hitTokens is how many of the prompt's tokens replica e holds: from its KV
// events when it sends them and the prompt's tokens are known, else from
// this router's history (PrefixBlock bytes a block, about 4 bytes a token).
func (p *picker) hitTokens(e *Endpoint, h hint) int {
	if p.kv != nil && h.tokens != nil {
		if hs, ok := p.kv.Hasher(e.Addr); ok {
			keys, named := h.keys[*hs]
			if !named {
				keys = hs.Keys(h.tokens, "") // its stream came after nameBlocks: rare
			}
			n, _ := p.kv.Match(e.Addr, keys)
			return n * hs.Block()
		}
	}
	return p.prefix.match(h.prefix, e.ID()) * PrefixBlock / 4
}

// prefixAIBrix is AIBrix's published prefix-cache rule (docs/design/figures.md §F3):
// least-request when max−min running > 16; else the best match whose running
// count is ≤ mean + 2σ; nil when none qualifies.
func (p *picker) prefixAIBrix(cands []*Endpoint, h hint) *Endpoint {
	lo, hi, sum, sq := math.Inf(1), math.Inf(-1), 0.0, 0.0
	for _, e := range cands {
		l := float64(p.counter(e.ID()).Load())
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
		ms = append(ms, m{e, p.prefix.match(h.prefix, e.ID())})
	}
	sort.SliceStable(ms, func(i, j int) bool {
		if ms[i].match != ms[j].match {
			return ms[i].match > ms[j].match
		}
		return p.counter(ms[i].e.ID()).Load() < p.counter(ms[j].e.ID()).Load()
	})
	for _, x := range ms {
		if float64(p.counter(x.e.ID()).Load()) <= bound {
			return x.e
		}
	}
	return nil
}

// Picker is the router's choice of replica outside an HTTP server, for the
// routing benchmark: the same strategies, state and rules, on a clock and a
// random source the caller gives, so that a run repeats exactly.
type Picker struct{ p *picker }

// PickRequest is what a strategy may look at in a request.
type PickRequest struct {
	Model   string
	Prompt  string   // the prompt's text (history-based strategies hash its first bytes)
	Tokens  []uint32 // its token ids as the engine tokenizes them; nil: unknown
	Session string
	// PrefixBytes is how much of the prompt the history-based strategies
	// hash (the router's --prefix-bytes; 0: its default).
	PrefixBytes int
	// MayWait: the caller holds the request when prefix-cache says it must
	// wait for room (hold.go), answered by no endpoint; it asks again, first
	// come first served, after a lease's FirstToken. Behind: other requests
	// of this caller are waiting ahead of this one.
	MayWait, Behind bool
}

// NewPicker returns a picker on the given clock and random seed, reading
// engines' KV events from kv (nil: none) and the other routers' prefill
// queues from queues (nil: none shared), holding at holdTokens (the
// router's --hold-prefill-tokens: 0 its default, -1 never).
func NewPicker(now func() time.Time, seed uint64, kv *KVIndex, queues *Queues, holdTokens int) *Picker {
	p := newPickerWith(now, seed, kv, queues)
	p.holdTokens = holdTokens
	switch {
	case holdTokens == 0:
		p.holdTokens = DefaultHoldPrefillTokens
	case holdTokens < 0:
		p.holdTokens = 0
	}
	return &Picker{p: p}
}

// Lease is a picked request's hold on its backend.
type Lease struct{ l *lease }

// FirstToken says the backend has sent the request's first token.
func (l Lease) FirstToken() { l.l.firstToken() }

// Done says the request ended.
func (l Lease) Done() { l.l.release() }

// Pick chooses among eps for req with a strategy; it returns the endpoint
// (nil when none, or with req.MayWait when the request must wait), the
// strategy applied, and the request's lease.
func (pk *Picker) Pick(strategy string, eps []*Endpoint, req PickRequest) (*Endpoint, string, Lease) {
	limit := req.PrefixBytes
	if limit <= 0 {
		limit = DefaultPrefixBytes
	}
	h := hint{model: req.Model, session: req.Session, tokens: req.Tokens, promptTokens: len(req.Tokens)}
	if h.tokens == nil {
		h.promptTokens = estimateTokens(req.Prompt)
	}
	if strategy == StrategyPrefixCache || strategy == StrategyPrefixAIBrix {
		h.prefix = prefixHashes(req.Prompt, limit)
		h.keys = map[kvhash.Namer][]uint64{}
		h.nameBlocks(pk.p.kv, eps)
	}
	if !req.MayWait {
		e, used, l := pk.p.pick(strategy, eps, h, nil)
		return e, used, Lease{l}
	}
	h.mayWait, h.behind = true, req.Behind
	pk.p.mu.Lock()
	defer pk.p.mu.Unlock()
	e, used, l, _ := pk.p.pickLocked(strategy, eps, h, nil)
	return e, used, Lease{l}
}

// estimateTokens guesses a text's tokens without a tokenizer: about 4 bytes each.
func estimateTokens(text string) int { return (len(text) + 3) / 4 }
