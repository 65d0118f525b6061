package sim

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	mrand "math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/shoalhq/shoal/internal/kvhash"
)

// Params shape the engine's step time and capacity.
//
// Step time = Base + PrefillPerToken·prefill_tokens + DecodePerSeq·decode_seqs
// + PerContextToken·Σcontext, so inter-token latency grows with batch size and
// context as it does on a GPU. The defaults follow the llm-d inference-sim H100
// profiles cited in docs/design/simulator.md §C2 (TTFT ≈ 80 ms + 0.5 ms/token
// for 70B TP8, ITL ≈ 25 ms); issue 3 calibrates named presets.
type Params struct {
	Base            time.Duration
	PrefillOverhead time.Duration // added to a step that prefills anything
	LoadTime        time.Duration // weight loading before the server listens
	PrefillPerToken time.Duration
	DecodePerSeq    time.Duration
	PerContextToken time.Duration
	MaxNumSeqs      int
	MaxBatchTokens  int
	NumGPUBlocks    int
	BlockSize       int
	MaxModelLen     int
	// EP is the expert-parallel all-to-all of a DP rank (nil: none).
	EP *EPCost
	// LoRALoad is loading one adapter into the worker (a load request, or
	// a step that brings an evicted adapter back); LoRAPerAdapter is what
	// each distinct adapter in a step adds to it (lora.go).
	LoRALoad       time.Duration
	LoRAPerAdapter time.Duration
}

// EPCost models one DP rank's share of expert parallelism per step: the
// all-to-all dispatch and combine (a latency, plus a cost per token for the
// share of tokens whose experts sit on other nodes, (nodes-1)/nodes), and,
// without expert load balancing, the wait for the rank holding the hottest
// experts (Imbalance multiplies the compute).
type EPCost struct {
	Nodes       int
	A2ALatency  time.Duration
	A2APerToken time.Duration
	Imbalance   float64 // ≥ 1; 1 with EPLB
}

// stepTime is a step of compute d over tokens with EP's costs added.
func (c *EPCost) stepTime(d time.Duration, tokens int) time.Duration {
	if c == nil {
		return d
	}
	if c.Imbalance > 1 {
		d = time.Duration(float64(d) * c.Imbalance)
	}
	d += c.A2ALatency
	if c.Nodes > 1 {
		d += time.Duration(float64(tokens) * float64(c.A2APerToken) * float64(c.Nodes-1) / float64(c.Nodes))
	}
	return d
}

// DefaultParams is a 70B-class model on 8 H100/H200.
func DefaultParams() Params {
	return Params{
		Base:            20 * time.Millisecond,
		PrefillPerToken: 250 * time.Microsecond,
		DecodePerSeq:    150 * time.Microsecond,
		PerContextToken: 20 * time.Nanosecond,
		MaxNumSeqs:      256,
		MaxBatchTokens:  8192,
		NumGPUBlocks:    8192,
		BlockSize:       16,
		MaxModelLen:     32768,
	}
}

// ErrEngineDead is returned for requests the engine can no longer serve.
var ErrEngineDead = errors.New("EngineCore encountered an issue. See stack trace (above) for the root cause.")

// token is one generated token, or the end of a request.
type token struct {
	text   string
	finish string // "", "stop", "length", "abort"
	stop   string // the stop string that ended the request, if any
	err    error
}

type request struct {
	id         string
	prompt     int
	maxTokens  int
	natural    int // where EOS would fall
	ignoreEOS  bool
	seed       uint64
	arrival    time.Time
	prefilled  int
	generated  int
	out        chan token
	ctx        context.Context
	preempted  bool
	hashes     []uint64 // the prompt's full blocks as the engine names them
	tokens     []uint32 // the prompt's token ids
	blockIDs   []int    // KV blocks held, in order
	held       []int    // blocks pulled from a prefill engine, held until admission
	origPrompt int      // prompt tokens as sent (prompt grows on preemption)
	emitted    int      // tokens sent to the client, across preemptions
	// Virtual timestamps (engine time, exact): arrival, first and last token.
	vArrival, vAdmit, vFirst, vLast time.Duration
	stops                           []string        // stop strings: output ends before the first match
	outText                         strings.Builder // output so far, to find stop strings across tokens
	stopped                         bool
	// script, when set, is the output token by token (a tool call's
	// arguments, JSON for a response_format): EOS falls at its end.
	script []string
	// lora is the adapter the request runs with ("": the base model).
	lora string
}

// Engine is the continuous-batching scheduler. One goroutine (Run) steps it.
type Engine struct {
	p       Params
	clock   Clock
	m       *metrics
	wake    chan struct{}
	mu      sync.Mutex
	waiting []*request // guarded by mu; FCFS, preempted requests at the front
	running []*request // guarded by mu
	kv      *blocks    // guarded by mu
	dead    error      // guarded by mu
	stalled bool       // guarded by mu; fault: steps produce nothing
	onDeath func()
	vnow    time.Duration // guarded by mu; virtual time: the sum of step times
	slow    float64       // guarded by mu; straggler factor ≥ 1
	namer   *kvhash.Namer // names prompt blocks (vLLM's sha256_cbor chain, or SGLang's pages)
	perPage bool          // SGLang: one BlockStored per page
	// publish, when set, gets each step's KV-cache events as one batch
	// (vLLM's scheduler hands the publisher a KVEventBatch per step).
	publish func(kvevents.Batch)
	pending []kvevents.Event // guarded by mu; this step's events
	lora    *loraSched       // guarded by mu; nil without --enable-lora
}

func newEngine(p Params, c Clock, m *metrics) *Engine {
	e := &Engine{p: p, clock: c, m: m, wake: make(chan struct{}, 1), slow: 1, kv: newBlocks(p.NumGPUBlocks)}
	e.setHashSeed("")
	e.kv.onEvict = func(h uint64) {
		if e.publish != nil {
			e.pending = append(e.pending, kvevents.Event{Kind: kvevents.Removed, Hashes: []uint64{h}, Medium: "GPU"})
		}
	}
	return e
}

// setHashSeed sets PYTHONHASHSEED for block naming; empty draws a random
// seed, as vLLM does without one (no two processes then agree on names).
func (e *Engine) setHashSeed(seed string) {
	if seed == "" {
		seed = strconv.FormatUint(mrand.Uint64(), 10) + "-random"
	}
	h, err := kvhash.NewVLLM(seed, e.p.BlockSize)
	if err != nil {
		panic("sim: block size must be positive") // Params are validated before an engine is built
	}
	e.namer = h
}

// name tokenizes a prompt and names its full blocks.
func (e *Engine) name(text string) ([]uint32, []uint64) {
	toks := tokenIDs(text)
	return toks, e.namer.Keys(toks, "")
}

// submit queues a request; tokens arrive on r.out.
func (e *Engine) submit(r *request) error {
	if e.blocksFor(r.prompt+r.maxTokens) > e.p.NumGPUBlocks {
		return fmt.Errorf("request needs %d tokens of KV cache, more than the %d the engine has", r.prompt+r.maxTokens, e.p.NumGPUBlocks*e.p.BlockSize)
	}
	e.mu.Lock()
	if e.dead != nil {
		e.mu.Unlock()
		return e.dead
	}
	r.vArrival = e.vnow
	e.waiting = append(e.waiting, r)
	e.mu.Unlock()
	e.m.setQueues(e)
	select {
	case e.wake <- struct{}{}:
	default:
	}
	return nil
}

// kill makes the engine dead: every request fails and new ones are refused.
func (e *Engine) kill(err error) {
	e.mu.Lock()
	if e.dead != nil {
		e.mu.Unlock()
		return
	}
	e.dead = err
	all := append(append([]*request{}, e.running...), e.waiting...)
	for _, r := range e.running {
		e.freeBlocks(r)
	}
	for _, r := range e.waiting {
		e.releaseHeld(r)
	}
	e.running, e.waiting = nil, nil
	cb := e.onDeath
	e.mu.Unlock()
	for _, r := range all {
		r.out <- token{err: err}
	}
	if cb != nil {
		cb()
	}
}

func (e *Engine) deadErr() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dead
}

func (e *Engine) blocksFor(tokens int) int { return (tokens + e.p.BlockSize - 1) / e.p.BlockSize }

// Run steps the engine until ctx ends.
func (e *Engine) Run(ctx context.Context) {
	for {
		e.mu.Lock()
		idle := len(e.running) == 0 && len(e.waiting) == 0
		e.mu.Unlock()
		if idle {
			select {
			case <-ctx.Done():
				return
			case <-e.wake:
			}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		e.step()
	}
}

// step runs one scheduler iteration: admit, prefill within the token budget,
// decode one token per running request, sleep the modelled step time, emit.
func (e *Engine) step() {
	st := e.prepareStep()
	if st == nil {
		return
	}
	e.clock.Sleep(st.d)
	e.finishStep(st, st.d)
}

// stepState is a step between its scheduling and its end.
type stepState struct {
	d             time.Duration // the step's own modelled time
	stepping      []*request
	prefillTokens int
	stalled       bool
	work          bool // anything to compute (false: a DP rank's dummy step)
}

// prepareStep schedules a step and models its time; nil when the engine is
// dead.
func (e *Engine) prepareStep() *stepState {
	e.mu.Lock()
	if e.dead != nil {
		e.mu.Unlock()
		return nil
	}
	// Drop requests whose client went away.
	kept := e.running[:0]
	for _, r := range e.running {
		if r.ctx.Err() != nil {
			e.freeBlocks(r)
			e.m.finished("abort")
			continue
		}
		kept = append(kept, r)
	}
	e.running = kept
	// Admit FCFS while there is a sequence slot and KV room for the prompt;
	// a request whose adapter would be one too many for the step waits
	// while later ones go ahead (vLLM's scheduler skips it).
	active := e.activeLoRAs()
	var skipped []*request
	loraLoads := 0
	for len(e.waiting) > 0 && len(e.running) < e.p.MaxNumSeqs {
		r := e.waiting[0]
		if r.ctx.Err() != nil {
			e.waiting = e.waiting[1:]
			e.releaseHeld(r)
			continue
		}
		if !e.loraFits(r, active) {
			skipped = append(skipped, r)
			e.waiting = e.waiting[1:]
			continue
		}
		// Prefix cache: reuse the longest cached prefix; vLLM always computes
		// at least the last prompt token.
		hits := e.kv.lookup(r.hashes)
		if limit := (r.prompt - 1) / e.p.BlockSize; len(hits) > limit {
			hits = hits[:limit]
		}
		need := e.blocksFor(r.prompt+1) - len(hits)
		evictableHits := 0
		for _, id := range hits {
			if e.kv.refs[id] == 0 {
				evictableHits++ // counted in available(), but about to be taken
			}
		}
		if need > e.kv.available()-evictableHits {
			break
		}
		e.waiting = e.waiting[1:]
		for _, id := range hits {
			e.kv.acquire(id)
		}
		e.releaseHeld(r) // pulled blocks are hits now
		r.blockIDs = append([]int(nil), hits...)
		for i := 0; i < need; i++ {
			r.blockIDs = append(r.blockIDs, e.kv.alloc())
		}
		r.prefilled = len(hits) * e.p.BlockSize
		if !r.preempted {
			r.vAdmit = e.vnow
			e.m.prefix(r.prompt, r.prefilled)
		}
		r.preempted = false
		e.running = append(e.running, r)
		if r.lora != "" && e.lora != nil {
			if e.lora.touch(r.lora, active) {
				loraLoads++ // evicted from the worker's cache: loaded again
			}
			active[r.lora] = true
		}
	}
	if len(skipped) > 0 {
		e.waiting = append(skipped, e.waiting...)
	}
	e.loraInfo()
	budget := e.p.MaxBatchTokens
	prefillTokens, decodeSeqs, ctxTokens := 0, 0, 0
	var decoders []*request
	for _, r := range e.running {
		if r.prefilled < r.prompt {
			chunk := min(budget, r.prompt-r.prefilled)
			if chunk <= 0 {
				continue
			}
			r.prefilled += chunk
			budget -= chunk
			prefillTokens += chunk
			if r.prefilled == r.prompt {
				// The prompt's full blocks now hold computed KV: cache them.
				first, last := -1, -1
				for i, h := range r.hashes {
					if i < len(r.blockIDs) && e.kv.register(r.blockIDs[i], h) {
						if first < 0 {
							first = i
						}
						last = i
					}
				}
				if first >= 0 && e.publish != nil {
					if e.perPage { // SGLang's radix cache: an event per page
						for i := first; i <= last; i++ {
							e.pending = append(e.pending, e.storedEvent(r, i, i))
						}
					} else {
						e.pending = append(e.pending, e.storedEvent(r, first, last))
					}
				}
				decoders = append(decoders, r) // the first token comes out of this step
			}
			continue
		}
		decoders = append(decoders, r)
	}
	// Decoding may need a new block; preempt the newest request when none is free.
	var stepping []*request
	for _, r := range decoders {
		if r.preempted {
			continue
		}
		need := e.blocksFor(r.prompt+r.generated+1) - len(r.blockIDs)
		for need > 0 && e.kv.available() < need {
			victim := e.running[len(e.running)-1]
			e.preempt(victim)
			if victim == r {
				break
			}
		}
		if r.preempted {
			continue
		}
		for i := 0; i < need; i++ {
			r.blockIDs = append(r.blockIDs, e.kv.alloc())
		}
		stepping = append(stepping, r)
		decodeSeqs++
		ctxTokens += r.prompt + r.generated
	}
	stalled, slow := e.stalled, e.slow
	e.m.setKV(e.kv.usage())
	e.mu.Unlock()

	d := e.p.Base + time.Duration(prefillTokens)*e.p.PrefillPerToken +
		time.Duration(decodeSeqs)*e.p.DecodePerSeq + time.Duration(ctxTokens)*e.p.PerContextToken
	if prefillTokens > 0 {
		d += e.p.PrefillOverhead
	}
	d += time.Duration(loraLoads)*e.p.LoRALoad + time.Duration(len(active))*e.p.LoRAPerAdapter
	d = e.p.EP.stepTime(d, prefillTokens+decodeSeqs)
	d = time.Duration(float64(d) * slow)
	return &stepState{d: d, stepping: stepping, prefillTokens: prefillTokens, stalled: stalled, work: prefillTokens+decodeSeqs > 0}
}

// finishStep ends a step that took d (its own time, or a DP wave's, the
// slowest rank's): tokens come out, finished requests retire.
func (e *Engine) finishStep(st *stepState, d time.Duration) {
	type emit struct {
		r   *request
		tok token
	}
	var emits []emit
	stepping, prefillTokens := st.stepping, st.prefillTokens
	if st.stalled {
		e.m.setQueues(e) // the scheduler still reports its queues
		return           // the #53157 hang: steps run, nothing comes out
	}
	now := time.Now()
	e.mu.Lock()
	e.vnow += d
	for _, r := range stepping {
		if r.preempted {
			continue
		}
		r.generated++
		r.emitted++
		if r.emitted == 1 {
			r.vFirst = e.vnow
		} else {
			e.m.itl.Observe((e.vnow - r.vLast).Seconds())
		}
		r.vLast = e.vnow
		t := token{text: word(r.seed, r.emitted)}
		if r.script != nil {
			t.text = ""
			if r.emitted <= len(r.script) {
				t.text = r.script[r.emitted-1]
			}
		}
		if len(r.stops) > 0 {
			before := r.outText.Len()
			r.outText.WriteString(t.text)
			out := r.outText.String()
			for _, st := range r.stops {
				if i := strings.Index(out, st); i >= 0 {
					// The stop string is not part of the output (vLLM's default).
					t.text, t.finish, t.stop, r.stopped = out[before:max(before, i)], "stop", st, true
					break
				}
			}
		}
		switch {
		case t.finish != "":
		case r.generated >= r.maxTokens:
			t.finish = "length"
		case !r.ignoreEOS && r.generated >= r.natural:
			t.finish = "stop"
		}
		emits = append(emits, emit{r, t})
	}
	// Retire finished requests.
	kept := e.running[:0]
	for _, r := range e.running {
		if r.stopped || r.generated >= r.maxTokens || (!r.ignoreEOS && r.generated >= r.natural) {
			e.freeBlocks(r)
			continue
		}
		kept = append(kept, r)
	}
	e.running = kept
	e.m.setKV(e.kv.usage())
	events := e.pending
	e.pending = nil
	e.mu.Unlock()
	if len(events) > 0 {
		e.publish(kvevents.Batch{TS: float64(time.Now().UnixNano()) / 1e9, Events: events})
	}
	e.m.step(prefillTokens, len(emits))
	for _, em := range emits {
		if em.r.emitted == 1 {
			e.m.ttft(now.Sub(em.r.arrival), e.clock)
		}
		if em.tok.finish != "" {
			e.m.request(em.r)
			e.m.finished(em.tok.finish)
			e.m.e2e(now.Sub(em.r.arrival), e.clock)
		}
		em.r.out <- em.tok
	}
	e.m.setQueues(e)
}

// storedEvent is vLLM's BlockStored for blocks first..last of r's prompt:
// their names, the name before them, and their tokens.
func (e *Engine) storedEvent(r *request, first, last int) kvevents.Event {
	ev := kvevents.Event{Kind: kvevents.Stored, Hashes: append([]uint64(nil), r.hashes[first:last+1]...),
		Tokens: append([]uint32(nil), r.tokens[first*e.p.BlockSize:(last+1)*e.p.BlockSize]...), BlockSize: e.p.BlockSize, Medium: "GPU"}
	if first > 0 {
		ev.Parent, ev.HasParent = r.hashes[first-1], true
	}
	return ev
}

// resetPrefixCache drops every unreferenced cached block and publishes
// AllBlocksCleared, as vLLM's reset_prefix_cache does.
func (e *Engine) resetPrefixCache() {
	e.mu.Lock()
	e.kv.clear()
	pub := e.publish
	e.mu.Unlock()
	if pub != nil {
		pub(kvevents.Batch{TS: float64(time.Now().UnixNano()) / 1e9, Events: []kvevents.Event{{Kind: kvevents.Cleared}}})
	}
}

// preempt frees a running request's blocks and puts it back at the front of
// the queue to be recomputed, as vLLM V1's recompute preemption does.
// Called with mu held.
func (e *Engine) preempt(r *request) {
	for i, x := range e.running {
		if x == r {
			e.running = append(e.running[:i], e.running[i+1:]...)
			break
		}
	}
	e.freeBlocks(r)
	r.prefilled = 0
	// Tokens already streamed stay streamed; recompute covers prompt + output.
	r.prompt += r.generated
	r.maxTokens -= r.generated
	r.natural -= r.generated
	r.generated = 0
	r.preempted = true
	e.waiting = append([]*request{r}, e.waiting...)
	e.m.preempted()
}

// freeBlocks drops a request's references; cached blocks stay for reuse.
// Called with mu held.
// releaseHeld drops the hold on blocks a request brought from a prefill
// engine. Caller holds e.mu.
func (e *Engine) releaseHeld(r *request) {
	for _, id := range r.held {
		e.kv.release(id)
	}
	r.held = nil
}

func (e *Engine) freeBlocks(r *request) {
	for _, id := range r.blockIDs {
		e.kv.release(id)
	}
	r.blockIDs = nil
}

func (e *Engine) queueLens() (running, waiting int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.running), len(e.waiting)
}

var words = []string{" the", " model", " answer", " is", " a", " token", " stream", " of", " simulated", " text",
	" from", " shoal", " and", " it", " keeps", " going", " until", " done", ".", ","}

// word is the n-th token's text for a request: deterministic from the seed.
func word(seed uint64, n int) string {
	x := seed + uint64(n)*0x9E3779B97F4A7C15
	x ^= x >> 31
	return words[x%uint64(len(words))]
}

// countTokens is the tokenizer stand-in: about 4 characters per token.
func countTokens(s string) int {
	n := (len(s) + 3) / 4
	if n == 0 {
		n = 1
	}
	return n
}

func hashString(s string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(s))
	return h.Sum64()
}
