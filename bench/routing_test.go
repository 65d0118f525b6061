package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/engine/sim"
)

const (
	replicas  = 4
	timeScale = 20.0 // virtual seconds per real second
)

type workload struct {
	name    string
	prompts func(i int, r *rand.Rand) string
}

// sharedPrefix: 48 tenants, each with a 4,000-token system prompt (the llm-d
// B2B shape, smaller): 192k tokens of prefixes, more than one replica's KV
// (128k) but less than four replicas' together.
func sharedPrefix() workload {
	sys := make([]string, 48)
	for g := range sys {
		line := fmt.Sprintf("Tenant %02d policy: answer within the rules of tenant %02d. ", g, g)
		sys[g] = strings.Repeat(line, 16000/len(line)+1)[:16000]
	}
	return workload{"shared-prefix", func(i int, r *rand.Rand) string {
		return sys[r.IntN(len(sys))] + fmt.Sprintf(" Question %d: what is %d + %d?", i, r.IntN(100), r.IntN(100))
	}}
}

// lowSharing: every prompt unique (ShareGPT-like control), 1,000 tokens.
func lowSharing() workload {
	return workload{"low-sharing", func(i int, r *rand.Rand) string {
		return strings.Repeat(fmt.Sprintf("unique %d-%d ", i, r.Int()), 4000/20+1)[:4000]
	}}
}

type result struct {
	p50, p90, p99 time.Duration // virtual TTFT
	tokPerSec     float64       // virtual output tokens/s
	errors        int
}

func run(b *testing.B, strategy string, w workload, conc, total int) result {
	p := sim.Presets["llama-8b-h100-tp1"].Params
	p.NumGPUBlocks = 8000 // 128k tokens of KV per replica
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var servers []*sim.Server
	var eps []*router.Endpoint
	for i := 0; i < replicas; i++ {
		s := sim.NewServer("m", p, timeScale)
		go s.Run(ctx)
		hs := httptest.NewServer(s.Handler())
		defer hs.Close()
		servers = append(servers, s)
		eps = append(eps, &router.Endpoint{Model: "m", Addr: strings.TrimPrefix(hs.URL, "http://"), Group: fmt.Sprint(i)})
	}
	table := router.NewTable()
	// The heads' metrics stream, emulated: every 100 ms (virtual 2 s).
	feed := func() {
		var fresh []*router.Endpoint
		for i, s := range servers {
			r, q, kv := s.Stats()
			e := *eps[i]
			e.Running, e.Waiting, e.KVCache, e.HasMetrics = float64(r), float64(q), kv, true
			fresh = append(fresh, &e)
		}
		table.Set(router.NewSnapshot(nil, fresh))
	}
	feed()
	go func() {
		for ctx.Err() == nil {
			time.Sleep(100 * time.Millisecond)
			feed()
		}
	}()
	rt := httptest.NewServer(router.New(table, slog.New(slog.NewTextHandler(io.Discard, nil)), router.Config{}).Handler())
	defer rt.Close()

	var next, tokens, errs atomic.Int64
	var mu sync.Mutex
	var ttfts []time.Duration
	start := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < conc; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(c), 7))
			for {
				i := next.Add(1)
				if i > int64(total) {
					return
				}
				body, _ := json.Marshal(map[string]any{"model": "m", "prompt": w.prompts(int(i), r), "max_tokens": 16, "ignore_eos": true, "stream": true})
				req, _ := http.NewRequest("POST", rt.URL+"/v1/completions", bytes.NewReader(body))
				req.Header.Set("routing-strategy", strategy)
				t0 := time.Now()
				resp, err := http.DefaultClient.Do(req)
				if err != nil || resp.StatusCode != 200 {
					errs.Add(1)
					if resp != nil {
						resp.Body.Close()
					}
					continue
				}
				first := time.Duration(0)
				sc := bufio.NewScanner(resp.Body)
				n := int64(0)
				for sc.Scan() {
					line := sc.Text()
					if strings.HasPrefix(line, "data: {") {
						if first == 0 {
							first = time.Since(t0)
						}
						n++
					}
				}
				resp.Body.Close()
				tokens.Add(n)
				mu.Lock()
				ttfts = append(ttfts, time.Duration(float64(first)*timeScale))
				mu.Unlock()
			}
		}(c)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds() * timeScale
	sort.Slice(ttfts, func(i, j int) bool { return ttfts[i] < ttfts[j] })
	q := func(f float64) time.Duration {
		if len(ttfts) == 0 {
			return 0
		}
		return ttfts[int(f*float64(len(ttfts)-1))]
	}
	return result{q(0.5), q(0.9), q(0.99), float64(tokens.Load()) / elapsed, int(errs.Load())}
}

// BenchmarkRouting compares strategies on a simulated 4-replica cluster
// (llama-8b-h100-tp1 preset, 128k tokens of KV each) against round-robin,
// near saturation. Times are virtual (the simulator's clock runs 20× real).
//
//	go test -run '^$' -bench Routing -benchtime 1x ./bench/
func BenchmarkRouting(b *testing.B) {
	strategies := []string{router.StrategyRoundRobin, router.StrategyRandom, router.StrategyLeastRequest, router.StrategyLeastKV,
		router.StrategyPrefixAIBrix, router.StrategyPrefixCache}
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		for _, w := range []workload{sharedPrefix(), lowSharing()} {
			fmt.Fprintf(os.Stdout, "\nworkload %s: 4 replicas, concurrency 32, 400 requests, 16 output tokens (virtual time)\n", w.name)
			fmt.Fprintf(os.Stdout, "%-20s %9s %9s %9s %11s %6s %12s %12s\n", "strategy", "TTFT p50", "p90", "p99", "out tok/s", "errors", "tput vs RR", "p90 RR/this")
			var base result
			for _, s := range strategies {
				r := run(b, s, w, 32, 400)
				if s == router.StrategyRoundRobin {
					base = r
				}
				fmt.Fprintf(os.Stdout, "%-20s %8.2fs %8.2fs %8.2fs %11.0f %6d %11.2fx %11.2fx\n", s, r.p50.Seconds(), r.p90.Seconds(), r.p99.Seconds(),
					r.tokPerSec, r.errors, r.tokPerSec/base.tokPerSec, base.p90.Seconds()/r.p90.Seconds())
			}
		}
	}
}
