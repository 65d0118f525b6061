package sim

import (
	"context"
	"math"
	"time"

	"github.com/shoalhq/shoal/internal/kvevents"
)

// Virtual is one engine stepped by its caller on a virtual clock, with no
// HTTP and no sleeping: the routing benchmark runs several and interleaves
// their steps with request arrivals in time order, so a run is a pure
// function of its inputs. Its scheduler, KV cache, block names and KV events
// are the served engine's own.
type Virtual struct {
	e      *Engine
	active []*VirtualRequest
	events []kvevents.Event
}

// VirtualRequest is a request's life in virtual time.
type VirtualRequest struct {
	r       *request
	Arrival time.Duration
	First   time.Duration // first token; 0 until it comes
	Done    time.Duration // last token; 0 until it comes
	Output  int
	Failed  bool
}

// NewVirtual builds an engine that names blocks with PYTHONHASHSEED=seed
// (vLLM's sha256_cbor chain) and keeps its KV events for Step to return.
func NewVirtual(p Params, seed string) *Virtual {
	m := newMetrics("sim", p.NumGPUBlocks, p.BlockSize, p.MaxModelLen, p.MaxBatchTokens, false)
	v := &Virtual{e: newEngine(p, Clock{Scale: math.Inf(1)}, m)}
	v.e.setHashSeed(seed)
	v.e.publish = func(b kvevents.Batch) { v.events = append(v.events, b.Events...) }
	return v
}

// Now is the engine's clock: the end of its last step.
func (v *Virtual) Now() time.Duration {
	v.e.mu.Lock()
	defer v.e.mu.Unlock()
	return v.e.vnow
}

// Busy says whether the engine has work to step.
func (v *Virtual) Busy() bool { return len(v.active) > 0 }

// Submit queues a request that arrives at virtual time at. An idle engine's
// clock moves up to at; a busy one takes it at its next step.
func (v *Virtual) Submit(at time.Duration, prompt string, maxTokens int) *VirtualRequest {
	tokens, hashes := v.e.name(prompt)
	r := &request{prompt: len(tokens), origPrompt: len(tokens), maxTokens: maxTokens, natural: maxTokens + 1, ignoreEOS: true,
		seed: uint64(len(v.active)), tokens: tokens, hashes: hashes, out: make(chan token, maxTokens+2), ctx: context.Background()}
	vr := &VirtualRequest{r: r, Arrival: at}
	v.e.mu.Lock()
	if len(v.active) == 0 && v.e.vnow < at {
		v.e.vnow = at
	}
	v.e.mu.Unlock()
	if err := v.e.submit(r); err != nil {
		vr.Failed = true
		return vr
	}
	r.vArrival = at
	v.active = append(v.active, vr)
	return vr
}

// Step runs one scheduler step. It returns the requests whose first token
// came out of it, those that finished in it, and the KV events it published,
// all as of Now().
func (v *Virtual) Step() (started, finished []*VirtualRequest, events []kvevents.Event) {
	v.e.step()
	kept := v.active[:0]
	for _, vr := range v.active {
		n, done, failed := drain(vr.r)
		vr.Output += n
		vr.Failed = vr.Failed || failed
		if vr.First == 0 && vr.r.emitted > 0 {
			vr.First = vr.r.vFirst
			started = append(started, vr)
		}
		if done {
			vr.Done = vr.r.vLast
			finished = append(finished, vr)
			continue
		}
		kept = append(kept, vr)
	}
	v.active = kept
	events, v.events = v.events, nil
	return started, finished, events
}

// Stats is what the head would report: running and waiting requests and
// KV-cache use (0-1).
func (v *Virtual) Stats() (running, waiting int, kv float64) {
	running, waiting = v.e.queueLens()
	v.e.mu.Lock()
	kv = v.e.kv.usage()
	v.e.mu.Unlock()
	return running, waiting, kv
}

// PrefixHitRate is the share of prompt tokens served from the cache so far.
func (v *Virtual) PrefixHitRate() float64 {
	q, h := counterValue(v.e.m.prefixQ), counterValue(v.e.m.prefixH)
	if q == 0 {
		return 0
	}
	return h / q
}

// Preemptions is how many requests the scheduler has preempted so far (the
// engine's vllm:num_preemptions): each one recomputes its prompt and output.
func (v *Virtual) Preemptions() int { return int(counterValue(v.e.m.preemptions)) }
