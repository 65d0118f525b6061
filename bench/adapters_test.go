package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoalhq/shoal/agent/adapters"
	"github.com/shoalhq/shoal/coordinator/adapterplan"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/engine/sim"
)

// BenchmarkAdapters: a Zipf-skewed workload over 50 LoRA adapters of one
// base model on 4 replicas (simulated vLLM engines, --max-loras 4,
// --max-cpu-loras 16), through shoal's router with its adapter affinity
// against least-request (the least loaded replica, which loads the adapter
// when it lacks it). Each replica's adapters are kept by the agent's own
// adapters.Manager over the engine's HTTP API, pinned as the coordinator
// pins them (adapterplan.Place); both start from the same placement.
// Printed: TTFT p50/p99 and adapter loads per minute, as ratios, over
// `runs` runs (engine time; the engines run adapterScale× faster than
// real time).
//
//	go test -run '^$' -bench Adapters -benchtime 1x -timeout 20m ./bench/
func BenchmarkAdapters(b *testing.B) {
	runs := 3
	if v := os.Getenv("ADAPTER_RUNS"); v != "" {
		fmt.Sscan(v, &runs)
	}
	dir := b.TempDir()
	for i := 0; i < adapterCount; i++ {
		d := filepath.Join(dir, adapterName(i))
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "adapter_config.json"), []byte(`{"peft_type":"LORA","r":16}`), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	type pair struct{ aff, lr adapterResult }
	var rs []pair
	for r := 0; r < runs; r++ {
		seed := uint64(r + 1)
		rs = append(rs, pair{runAdapters(b, router.AdapterAffinity, dir, seed), runAdapters(b, router.AdapterLeastRequest, dir, seed)})
	}
	fmt.Printf("\nadapters: %d adapters (Zipf s=%.1f) on %d replicas, %d req at %.0f req/s, engine time\n", adapterCount, zipfS, adapterReplicas, adapterRequests, adapterRate)
	fmt.Printf("%-4s %-14s %9s %9s %9s %7s %7s\n", "run", "routing", "p50 ms", "p99 ms", "loads/min", "failed", "hit%")
	var p99s, loads []float64
	for i, p := range rs {
		for _, x := range []struct {
			name string
			r    adapterResult
		}{{"affinity", p.aff}, {"least-request", p.lr}} {
			fmt.Printf("%-4d %-14s %9.0f %9.0f %9.1f %7d %6.0f%%\n", i+1, x.name, x.r.p50*1000, x.r.p99*1000, x.r.loadsPerMin, x.r.failed, 100*x.r.held)
		}
		p99s = append(p99s, p.lr.p99/p.aff.p99)
		loads = append(loads, p.lr.loadsPerMin/math.Max(p.aff.loadsPerMin, 0.1))
	}
	fmt.Printf("least-request / affinity: TTFT p99 %s (median %.2f×), loads per minute %s (median %.1f×)\n",
		ratios(p99s), medianF(p99s), ratios(loads), medianF(loads))
}

const (
	adapterCount    = 50
	adapterReplicas = 4
	adapterRequests = 1500
	adapterRate     = 24.0 // requests per second of engine time
	adapterScale    = 4.0  // engine time runs this much faster than real time
	zipfS           = 1.1
)

func adapterName(i int) string { return fmt.Sprintf("lora-%02d", i) }

func ratios(xs []float64) string {
	var s []string
	for _, x := range xs {
		s = append(s, fmt.Sprintf("%.2f×", x))
	}
	return strings.Join(s, " ")
}

func medianF(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

type adapterResult struct {
	p50, p99    float64 // TTFT, engine seconds
	loadsPerMin float64 // adapter loads per minute of engine time
	failed      int
	held        float64 // share of requests whose adapter was held where they went (no load waited for)
}

// managers is the router's AdapterLoader over the replicas' managers.
type managers map[string]*adapters.Manager

func (m managers) LoadAdapter(ctx context.Context, ep *router.Endpoint, name string) error {
	return adapters.StatusError(m[ep.Group].Load(ctx, name))
}

func runAdapters(b *testing.B, mode, dir string, seed uint64) adapterResult {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p := sim.Presets["llama-8b-h100-tp1"].Params
	var wg sync.WaitGroup
	var srvs []*sim.Server
	var https []*http.Server
	mgrs := managers{}
	var loads atomic.Int64
	var eps []string
	for i := 0; i < adapterReplicas; i++ {
		s := sim.NewServer("llama", p, adapterScale)
		s.EnableLoRA(4, 16, 16)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		hs := &http.Server{Handler: s.Handler()}
		wg.Add(2)
		go func() { defer wg.Done(); s.Run(ctx) }()
		go func() { defer wg.Done(); _ = hs.Serve(ln) }()
		srvs, https, eps = append(srvs, s), append(https, hs), append(eps, ln.Addr().String())
		g := fmt.Sprintf("g%d", i)
		mgrs[g] = adapters.New(adapters.Config{Slots: 16, Engine: &adapters.HTTPEngine{Base: "http://" + ln.Addr().String()},
			Fetch: func(_ context.Context, s adapters.Spec, _ func(string)) (string, error) { return s.Source, nil },
			OnLoad: func(_ string, _ time.Duration, err error) {
				if err == nil {
					loads.Add(1)
				}
			}})
	}
	defer func() {
		for _, m := range mgrs {
			m.Close()
			<-m.Done()
		}
		for _, hs := range https {
			_ = hs.Close()
		}
		cancel()
		wg.Wait()
	}()
	// The coordinator's placement: every adapter pinned on one replica.
	var cat []adapters.Spec
	var ads []adapterplan.Adapter
	for i := 0; i < adapterCount; i++ {
		cat = append(cat, adapters.Spec{Name: adapterName(i), Source: filepath.Join(dir, adapterName(i)), Rank: 16})
		ads = append(ads, adapterplan.Adapter{Name: adapterName(i)})
	}
	var reps []adapterplan.Replica
	for i := 0; i < adapterReplicas; i++ {
		reps = append(reps, adapterplan.Replica{Group: fmt.Sprintf("g%d", i), Serving: true, Slots: 16})
	}
	place := adapterplan.Place(adapterplan.Input{Adapters: ads, Replicas: reps})
	for g, m := range mgrs {
		m.Set(cat, place.Pins[g], nil, nil)
	}
	catalog := map[string]int{}
	for _, a := range cat {
		catalog[a.Name] = 0
	}
	table := router.NewTable()
	feed := func() {
		var out []*router.Endpoint
		for i, s := range srvs {
			g := fmt.Sprintf("g%d", i)
			run, wait, kv := s.Stats()
			var loaded []string
			for _, st := range mgrs[g].States() {
				if st.State == adapters.Loaded {
					loaded = append(loaded, st.Name)
				}
			}
			out = append(out, (&router.Endpoint{Model: "llama", Deployment: "llama", Group: g, NodeID: g, Addr: eps[i],
				Running: float64(run), Waiting: float64(wait), KVCache: kv, HasMetrics: true}).WithAdapters(16, loaded, catalog))
		}
		table.Set(router.NewSnapshot([]string{"llama"}, out))
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		feed()
		all := 0
		for _, m := range mgrs {
			for _, st := range m.States() {
				if st.State == adapters.Loaded {
					all++
				}
			}
		}
		if all == adapterCount {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("pinned adapters did not load: %d of %d", all, adapterCount)
		}
		time.Sleep(20 * time.Millisecond)
	}
	loads.Store(0)
	fctx, fstop := context.WithCancel(ctx)
	var fwg sync.WaitGroup
	fwg.Add(1)
	go func() {
		defer fwg.Done()
		t := time.NewTicker(time.Duration(float64(time.Second) / adapterScale)) // a head reports every second of engine time
		defer t.Stop()
		for {
			select {
			case <-fctx.Done():
				return
			case <-t.C:
				feed()
			}
		}
	}()
	reg := prometheus.NewRegistry()
	rt := router.New(table, slog.New(slog.DiscardHandler), router.Config{Adapters: mgrs, AdapterRouting: mode, Retries: -1, Registry: reg})
	defer rt.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	front := &http.Server{Handler: rt.Handler()}
	go func() { _ = front.Serve(ln) }()
	defer front.Close()
	url := "http://" + ln.Addr().String() + "/v1/completions"

	rnd := rand.New(rand.NewPCG(seed, seed*7919))
	zipf := rand.NewZipf(rnd, zipfS, 1, adapterCount-1)
	type req struct {
		at    time.Duration
		model string
		in    int
		out   int
	}
	var reqs []req
	var at time.Duration
	for i := 0; i < adapterRequests; i++ {
		at += time.Duration(rnd.ExpFloat64() / adapterRate * float64(time.Second))
		reqs = append(reqs, req{at: at, model: adapterName(int(zipf.Uint64())), in: 100 + rnd.IntN(400), out: 16 + rnd.IntN(48)})
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 512}}
	ttfts := make([]float64, len(reqs))
	var failed atomic.Int64
	var rwg sync.WaitGroup
	start := time.Now()
	for i, r := range reqs {
		if d := time.Duration(float64(r.at)/adapterScale) - time.Since(start); d > 0 {
			time.Sleep(d)
		}
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"ignore_eos":true,"stream":true}`, r.model, strings.Repeat("x ", r.in), r.out)
			sent := time.Now()
			resp, err := client.Post(url, "application/json", strings.NewReader(body))
			if err != nil {
				if failed.Add(1) <= 3 {
					fmt.Fprintf(os.Stderr, "failed: %v\n", err)
				}
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				eb, _ := io.ReadAll(resp.Body)
				if failed.Add(1) <= 3 {
					fmt.Fprintf(os.Stderr, "failed: %d %s\n", resp.StatusCode, eb)
				}
				return
			}
			sc := bufio.NewScanner(resp.Body)
			first := true
			for sc.Scan() {
				if first && strings.HasPrefix(sc.Text(), "data: {") {
					ttfts[i] = time.Since(sent).Seconds() * adapterScale
					first = false
				}
			}
		}()
	}
	rwg.Wait()
	wall := time.Since(start)
	fstop()
	fwg.Wait()
	var ok []float64
	for _, t := range ttfts {
		if t > 0 {
			ok = append(ok, t)
		}
	}
	sort.Float64s(ok)
	q := func(f float64) float64 {
		if len(ok) == 0 {
			return 0
		}
		return ok[min(len(ok)-1, int(f*float64(len(ok))))]
	}
	engineMin := wall.Minutes() * adapterScale
	// Requests held for a load: the router's own histogram of those waits.
	coldWaits := 0.0
	if fams, err := reg.Gather(); err == nil {
		for _, f := range fams {
			if f.GetName() == "shoal_router_adapter_load_wait_seconds" {
				coldWaits = float64(f.GetMetric()[0].GetHistogram().GetSampleCount()) / float64(len(reqs))
			}
		}
	}
	return adapterResult{p50: q(0.5), p99: q(0.99), loadsPerMin: float64(loads.Load()) / engineMin, failed: int(failed.Load()), held: 1 - coldWaits}
}
