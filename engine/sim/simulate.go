package sim

import (
	"context"
	"math"
	"sort"
	"time"
)

// Result of a simulated closed-loop run, in virtual (engine) time.
type Result struct {
	Requests        int
	TTFTP50         time.Duration
	ITLMean         time.Duration
	OutputTokPerSec float64
	Preemptions     int
}

// Simulate runs the engine synchronously, without sleeping, keeping
// concurrency requests in flight until total have finished. Each request has
// promptTokens of distinct text (no prefix sharing) and ignores EOS until
// outputTokens. Timings are exact virtual times, so results are repeatable.
func Simulate(p Params, promptTokens, outputTokens, concurrency, total int) Result {
	m := newMetrics("sim", p.NumGPUBlocks, p.BlockSize, p.MaxModelLen, p.MaxBatchTokens, false)
	e := newEngine(p, Clock{Scale: math.Inf(1)}, m)
	ctx := context.Background()
	next := 0
	submit := func() *request {
		next++
		r := &request{prompt: promptTokens, origPrompt: promptTokens, maxTokens: outputTokens, natural: outputTokens + 1,
			ignoreEOS: true, seed: uint64(next), out: make(chan token, outputTokens+2), ctx: ctx}
		_ = e.submit(r)
		return r
	}
	active := map[*request]bool{}
	for i := 0; i < concurrency && next < total; i++ {
		active[submit()] = true
	}
	var ttfts []time.Duration
	var itlSum time.Duration
	var itlN, outTokens int
	for len(active) > 0 {
		e.step()
		for r := range active {
			n, done, _ := drain(r)
			outTokens += n
			if !done {
				continue
			}
			delete(active, r)
			ttfts = append(ttfts, r.vFirst-r.vArrival)
			if r.emitted > 1 {
				itlSum += r.vLast - r.vFirst
				itlN += r.emitted - 1
			}
			if next < total {
				active[submit()] = true
			}
		}
	}
	sort.Slice(ttfts, func(i, j int) bool { return ttfts[i] < ttfts[j] })
	res := Result{Requests: len(ttfts)}
	if len(ttfts) > 0 {
		res.TTFTP50 = ttfts[len(ttfts)/2]
	}
	if itlN > 0 {
		res.ITLMean = itlSum / time.Duration(itlN)
	}
	if e.vnow > 0 {
		res.OutputTokPerSec = float64(outTokens) / e.vnow.Seconds()
	}
	res.Preemptions = int(counterValue(m.preemptions))
	return res
}

// drain takes what a request's engine has sent it so far: how many tokens,
// and whether it ended (finished, or failed).
func drain(r *request) (tokens int, done, failed bool) {
	for {
		select {
		case t := <-r.out:
			if t.err != nil {
				done, failed = true, true
				continue
			}
			tokens++
			done = done || t.finish != ""
		default:
			return tokens, done, failed
		}
	}
}
