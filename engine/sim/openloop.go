package sim

import (
	"context"
	"math"
	mrand "math/rand/v2"
	"sort"
	"time"
)

// Group is a replica of one or more engines for SimulateOpenLoop: one TP ×
// PP engine, or DP ranks stepping in lockstep (each wave as long as its
// slowest rank's step, as MoE DP ranks run).
type Group struct {
	Params Params // per engine (with EP costs for DP + EP ranks)
	Ranks  int
	// Eligible limits the ranks requests may go to (nil: all): routing only
	// to a head's API server reaches only its node's ranks.
	Eligible []int
}

// OpenLoopResult is a run in virtual time.
type OpenLoopResult struct {
	Requests               int
	OutTokPerSec           float64
	TTFTP50, TTFTP99       time.Duration
	ITLP50, ITLP99         time.Duration
	Duration               time.Duration
	MaxWaiting, MaxRunning int
}

// SimulateOpenLoop offers total requests of prompt tokens (distinct text,
// no prefix sharing) and output tokens (EOS ignored) at rate per second of
// virtual time, Poisson arrivals from seed, each sent to the eligible rank
// with the fewest waiting × 4 + running (vLLM's DP balancer; shoal's
// least-request is the same at one request per pick). Timings are exact
// virtual times; no sleeping.
func SimulateOpenLoop(g Group, rate float64, prompt, output, total int, seed uint64) OpenLoopResult {
	rng := mrand.New(mrand.NewPCG(seed, seed^0x9E3779B97F4A7C15))
	engines := make([]*Engine, g.Ranks)
	for i := range engines {
		engines[i] = newEngine(g.Params, Clock{Scale: math.Inf(1)}, newMetrics("sim", g.Params.NumGPUBlocks, g.Params.BlockSize, g.Params.MaxModelLen, g.Params.MaxBatchTokens, false))
	}
	ranks := &dpRanks{engines: engines}
	eligible := g.Eligible
	if eligible == nil {
		for i := range engines {
			eligible = append(eligible, i)
		}
	}
	arrivals := make([]time.Duration, total)
	var at float64
	for i := range arrivals {
		at += rng.ExpFloat64() / rate
		arrivals[i] = time.Duration(at * float64(time.Second))
	}
	type track struct {
		r       *request
		seen    int
		lastTok time.Duration
	}
	var active []*track
	var ttfts, itls []time.Duration
	res := OpenLoopResult{}
	ctx := context.Background()
	now, next, outTokens := time.Duration(0), 0, 0
	setClock := func(t time.Duration) {
		for _, e := range engines {
			e.mu.Lock()
			e.vnow = t
			e.mu.Unlock()
		}
	}
	for next < total || len(active) > 0 {
		if len(active) == 0 && next < total && now < arrivals[next] {
			now = arrivals[next]
			setClock(now)
		}
		for next < total && arrivals[next] <= now {
			best, score := eligible[0], math.MaxInt
			for _, i := range eligible {
				run, wait := engines[i].queueLens()
				if s := wait*4 + run; s < score {
					best, score = i, s
				}
			}
			r := &request{id: "r", prompt: prompt, origPrompt: prompt, maxTokens: output, natural: output + 1, ignoreEOS: true,
				seed: uint64(next), arrival: time.Now(), out: make(chan token, output+2), ctx: ctx, vArrival: arrivals[next]}
			_ = engines[best].submit(r)
			active = append(active, &track{r: r})
			next++
		}
		for _, e := range engines {
			run, wait := e.queueLens()
			res.MaxRunning, res.MaxWaiting = max(res.MaxRunning, run), max(res.MaxWaiting, wait)
		}
		// One wave: every engine steps (idle DP ranks run a dummy step).
		now += ranks.wave(func(time.Duration) {})
		kept := active[:0]
		for _, tr := range active {
			n, done, _ := drain(tr.r)
			outTokens += n
			if tr.r.emitted > tr.seen {
				if tr.seen == 0 {
					ttfts = append(ttfts, tr.r.vFirst-tr.r.vArrival)
				} else {
					itls = append(itls, now-tr.lastTok)
				}
				tr.seen, tr.lastTok = tr.r.emitted, now
			}
			if done {
				res.Requests++
				continue
			}
			kept = append(kept, tr)
		}
		active = kept
	}
	res.Duration = now - arrivals[0]
	if res.Duration > 0 {
		res.OutTokPerSec = float64(outTokens) / res.Duration.Seconds()
	}
	res.TTFTP50, res.TTFTP99 = quantile(ttfts, 0.5), quantile(ttfts, 0.99)
	res.ITLP50, res.ITLP99 = quantile(itls, 0.5), quantile(itls, 0.99)
	return res
}

// quantile is the q-quantile of xs (sorted in place; 0 when empty).
func quantile(xs []time.Duration, q float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	sort.Slice(xs, func(i, j int) bool { return xs[i] < xs[j] })
	return xs[min(len(xs)-1, int(q*float64(len(xs))))]
}
