package sim

import (
	"container/heap"
	"context"
	"math"
	mrand "math/rand/v2"
	"slices"
	"time"
)

// Serving is a fleet of independent engines for SimulateServing: colocated
// engines that serve requests whole, or prefill engines and decode engines
// with the KV moved between them (vLLM's NixlConnector as a proxy drives
// it: docs/design/pd.md).
type Serving struct {
	Params Params // per engine
	// Colocated engines serve requests whole; with Prefill > 0 there are
	// none, and Prefill + Decode engines serve disaggregated.
	Colocated, Prefill, Decode int
	// DecodeParams, when set, is the decode engines' (else Params).
	DecodeParams *Params
	// KVBytesPerToken and LinkGBps price a transfer: the prompt's KV bytes
	// over the link between the two engines.
	KVBytesPerToken int64
	LinkGBps        float64
	// Handshake is paid on a pair's first transfer (NIXL's lazy
	// handshake); 0: the pairs were warmed.
	Handshake time.Duration
	// Hop is the router's added time between the prefill engine's answer
	// and the decode engine's receipt.
	Hop time.Duration
}

// Load is an open-loop workload: Total requests at Rate per second of
// virtual time (Poisson, seeded; with Even, one every 1/Rate s, as
// inference-perf's constant load sends them), each Prompt tokens of
// distinct text and Output tokens (EOS ignored).
type Load struct {
	Rate           float64
	Prompt, Output int
	Total          int
	Seed           uint64
	Even           bool
}

// SLO is a request's latency target: its first token within TTFT and its
// mean inter-token gap within ITL (DistServe's goodput).
type SLO struct {
	TTFT, ITL time.Duration
}

// ServingResult is one SimulateServing run, in virtual time.
type ServingResult struct {
	Requests         int
	OutTokPerSec     float64
	TTFTP50, TTFTP99 time.Duration
	ITLP50, ITLP99   time.Duration
	// TTFTMean, and a request's whole time (arrival to last token): its
	// mean and p50; TPOTMean is the mean over requests of (last − first
	// token) / (tokens − 1), what benchmark clients report as TPOT.
	TTFTMean, E2EMean, E2EP50 time.Duration
	TPOTMean                  time.Duration
	// Goodput is the requests per second that met the SLO.
	Goodput  float64
	Duration time.Duration
	// PromptTokPerSec is the prompt tokens computed per second on the
	// prefill engines (disaggregated) or all engines (colocated).
	PromptTokPerSec float64
}

// transfer is a prompt's KV on its way from a prefill engine to a decode
// engine.
type transfer struct {
	at  time.Duration // when the decode engine has it
	job *pdJob
	p   *Engine
	ids []int // the prefill engine's blocks, held until read
}

type transfers []*transfer

func (h transfers) Len() int           { return len(h) }
func (h transfers) Less(i, j int) bool { return h[i].at < h[j].at }
func (h transfers) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *transfers) Push(x any)        { *h = append(*h, x.(*transfer)) }
func (h *transfers) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// pdJob is one client request through the fleet.
type pdJob struct {
	n       int
	arrival time.Duration
	r       *request // on the engine now (prefill, then decode)
	eng     *Engine
	decode  bool // r is the decode (or colocated) request
	seen    int
	first   time.Duration
	last    time.Duration
	itlSum  time.Duration
	hashes  []uint64
}

// SimulateServing offers load to the fleet in virtual time and measures
// what a client sees: TTFT (the first token of the engine that decodes),
// ITL, output throughput and goodput under slo. Engines step
// independently, each on its own clock; the next event — an arrival, a
// transfer landing, the earliest engine's step — is always the earliest in
// time. Requests go to the engine with the fewest waiting × 4 + running
// (vLLM's balancer); a prefilled request goes to the decode engine with
// the fewest running + waiting, with its KV after the transfer (the
// prefill engine's blocks held until then). Exact and repeatable; no
// sleeping.
func SimulateServing(s Serving, l Load, slo SLO) ServingResult {
	rng := mrand.New(mrand.NewPCG(l.Seed, l.Seed^0x9E3779B97F4A7C15))
	mk := func(p Params) *Engine {
		return newEngine(p, Clock{Scale: math.Inf(1)}, newMetrics("sim", p.NumGPUBlocks, p.BlockSize, p.MaxModelLen, p.MaxBatchTokens, false))
	}
	var front, back []*Engine // where requests arrive; where prefilled ones decode
	if s.Prefill > 0 {
		dp := s.Params
		if s.DecodeParams != nil {
			dp = *s.DecodeParams
		}
		for i := 0; i < s.Prefill; i++ {
			front = append(front, mk(s.Params))
		}
		for i := 0; i < s.Decode; i++ {
			back = append(back, mk(dp))
		}
	} else {
		for i := 0; i < s.Colocated; i++ {
			front = append(front, mk(s.Params))
		}
	}
	all := append(append([]*Engine{}, front...), back...)
	arrivals := make([]time.Duration, l.Total)
	var at float64
	for i := range arrivals {
		if l.Even {
			at = float64(i) / l.Rate
		} else {
			at += rng.ExpFloat64() / l.Rate
		}
		arrivals[i] = time.Duration(at * float64(time.Second))
	}
	ctx := context.Background()
	onEngine := map[*Engine][]*pdJob{}
	paired := map[[2]*Engine]bool{}
	var xfers transfers
	var ttfts, itls, e2es []time.Duration
	var tpotSum time.Duration
	res := ServingResult{}
	good, outTokens, promptTokens := 0, 0, 0
	busy := func(e *Engine) bool { run, wait := e.queueLens(); return run+wait > 0 }
	// place submits r on e at time t (an idle engine's clock moves up to t).
	place := func(e *Engine, j *pdJob, r *request, t time.Duration) {
		e.mu.Lock()
		if len(e.running)+len(e.waiting) == 0 && e.vnow < t {
			e.vnow = t
		}
		e.mu.Unlock()
		_ = e.submit(r)
		r.vArrival = t
		j.r, j.eng = r, e
		onEngine[e] = append(onEngine[e], j)
	}
	leastLoaded := func(es []*Engine, waitWeight int) *Engine {
		best, score := es[0], math.MaxInt
		for _, e := range es {
			run, wait := e.queueLens()
			if sc := wait*waitWeight + run; sc < score {
				best, score = e, sc
			}
		}
		return best
	}
	blockSize := s.Params.BlockSize
	next, done := 0, 0
	var end time.Duration
	for done < l.Total {
		tArr := time.Duration(math.MaxInt64)
		if next < l.Total {
			tArr = arrivals[next]
		}
		tX := time.Duration(math.MaxInt64)
		if len(xfers) > 0 {
			tX = xfers[0].at
		}
		var stepE *Engine
		tStep := time.Duration(math.MaxInt64)
		for _, e := range all {
			if busy(e) && e.vnow < tStep {
				stepE, tStep = e, e.vnow
			}
		}
		switch {
		case tArr <= tX && tArr <= tStep && next < l.Total:
			j := &pdJob{n: next, arrival: tArr}
			nb := (l.Prompt + blockSize - 1) / blockSize
			j.hashes = make([]uint64, nb)
			for i := range j.hashes {
				j.hashes[i] = uint64(next)<<20 | uint64(i) + 1
			}
			maxTok := l.Output
			if s.Prefill > 0 {
				maxTok = 1 // the proxy's prefill request
			} else {
				j.decode = true
			}
			r := &request{id: "r", prompt: l.Prompt, origPrompt: l.Prompt, maxTokens: maxTok, natural: maxTok + 1, ignoreEOS: true,
				seed: uint64(next), out: make(chan token, l.Output+2), ctx: ctx, hashes: j.hashes}
			place(leastLoaded(front, 4), j, r, tArr)
			next++
		case tX <= tStep && len(xfers) > 0:
			x := heap.Pop(&xfers).(*transfer)
			x.p.releaseHold(x.ids) // read: the prefill engine frees them
			d := x.job.eng         // chosen when the prefill answered
			r := &request{id: "r", prompt: l.Prompt, origPrompt: l.Prompt, maxTokens: l.Output, natural: l.Output + 1, ignoreEOS: true,
				seed: uint64(x.job.n), out: make(chan token, l.Output+2), ctx: ctx, hashes: x.job.hashes}
			inject(d, r)
			x.job.decode = true
			place(d, x.job, r, x.at)
		case stepE != nil:
			e := stepE
			st := e.prepareStep()
			e.finishStep(st, st.d)
			if !slices.Contains(back, e) { // a decode engine's last-token compute is not a prefill
				promptTokens += st.prefillTokens
			}
			now := e.vnow
			kept := onEngine[e][:0]
			for _, j := range onEngine[e] {
				n, fin, _ := drain(j.r)
				if !j.decode {
					if !fin {
						kept = append(kept, j)
						continue
					}
					// Prefilled: hold its blocks, pick the decode engine, start the transfer.
					ids := e.holdPrompt(j.hashes)
					d := leastLoaded(back, 1)
					land := now + s.Hop + kvTransferTime(l.Prompt, s.KVBytesPerToken, s.LinkGBps)
					if !paired[[2]*Engine{e, d}] {
						paired[[2]*Engine{e, d}] = true
						land += s.Handshake
					}
					j.eng = d
					heap.Push(&xfers, &transfer{at: land, job: j, p: e, ids: ids})
					continue
				}
				outTokens += n
				if j.r.emitted > j.seen {
					if j.seen == 0 {
						j.first = j.r.vFirst
						ttfts = append(ttfts, j.first-j.arrival)
					} else {
						itls = append(itls, now-j.last)
						j.itlSum += now - j.last
					}
					j.seen, j.last = j.r.emitted, now
				}
				if fin {
					done++
					res.Requests++
					end = max(end, now)
					e2es = append(e2es, now-j.arrival)
					if j.seen > 1 {
						tpotSum += (j.last - j.first) / time.Duration(j.seen-1)
					}
					ok := j.first-j.arrival <= slo.TTFT
					if j.seen > 1 && j.itlSum/time.Duration(j.seen-1) > slo.ITL {
						ok = false
					}
					if ok {
						good++
					}
					continue
				}
				kept = append(kept, j)
			}
			onEngine[e] = kept
		default:
			end = max(end, tArr)
			done = l.Total // nothing left to happen (cannot be reached with work pending)
		}
	}
	res.Duration = end - arrivals[0]
	if secs := res.Duration.Seconds(); secs > 0 {
		res.OutTokPerSec = float64(outTokens) / secs
		res.Goodput = float64(good) / secs
		res.PromptTokPerSec = float64(promptTokens) / secs
	}
	res.TTFTMean, res.E2EMean = mean(ttfts), mean(e2es)
	if res.Requests > 0 {
		res.TPOTMean = tpotSum / time.Duration(res.Requests)
	}
	res.TTFTP50, res.TTFTP99 = quantile(ttfts, 0.5), quantile(ttfts, 0.99)
	res.ITLP50, res.ITLP99 = quantile(itls, 0.5), quantile(itls, 0.99)
	res.E2EP50 = quantile(e2es, 0.5)
	return res
}

// mean is the mean of xs (0 when empty).
func mean(xs []time.Duration) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	var sum time.Duration
	for _, x := range xs {
		sum += x
	}
	return sum / time.Duration(len(xs))
}
