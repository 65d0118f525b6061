package bench

import (
	"container/heap"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/engine/sim"
	"github.com/shoalhq/shoal/internal/kvhash"
)

// The routing benchmark is a discrete-event simulation: simulated engines
// (engine/sim's scheduler, KV cache, block names and KV events, stepped
// without sleeping), the router's own picker and KV index, and the wires
// between them — metrics every second, KV events a few milliseconds after the
// step that made them, a /tokenize round trip, the routers' queue counts
// passed on through the heads — all on one virtual clock. A
// run is a pure function of its seed: the same command prints the same table.

const (
	replicas       = 4
	blockSize      = 16
	hashSeed       = "1234" // PYTHONHASHSEED the agent sets for the deployment
	metricsEvery   = time.Second
	eventDelay     = 5 * time.Millisecond // engine step → ZMQ → head → gRPC → router
	queueDelay     = 5 * time.Millisecond // router → head → the other routers (Replica API Queue streams)
	tokenizeCost   = time.Millisecond     // the router's /tokenize call before a KV-event pick
	strategyEvents = router.StrategyPrefixCache
	historyLabel   = "prefix-cache (history)" // prefix-cache with no KV events: the router's own estimate
	noWaitLabel    = "prefix-cache (no wait)" // prefix-cache with KV events that never holds a request at the router
)

// holdTokens is the routers' --hold-prefill-tokens (0: the router's
// default); ROUTING_HOLD sets it.
var holdTokens = 0

// arrival is one request of a workload.
type arrival struct {
	at     time.Duration
	prompt string
	out    int
}

type workload struct {
	name, shape string
	gen         func(seed uint64) []arrival
}

// poisson spaces n arrivals at rate per second.
func poisson(r *rand.Rand, n int, rate float64) []time.Duration {
	out := make([]time.Duration, n)
	t := 0.0
	for i := range out {
		t += r.ExpFloat64() / rate
		out[i] = time.Duration(t * float64(time.Second))
	}
	return out
}

// text is n tokens (4n bytes) of filler that differs with tag from its start.
func text(tag string, n int) string {
	unit := tag + " lorem ipsum dolor sit amet. "
	return strings.Repeat(unit, 4*n/len(unit)+1)[:4*n]
}

// sharedPrefix: 48 tenants, each with a 4,000-token system prompt (the llm-d
// B2B shape, smaller), 192k tokens of prefixes — more than one replica's KV
// (128k) but less than four replicas' together — and a short question each.
func sharedPrefix(n int, rate float64) workload {
	return workload{"shared-prefix", fmt.Sprintf("48 tenants × 4,000-token system prompt, %d requests at %.0f/s, 32 output tokens", n, rate),
		func(seed uint64) []arrival {
			r := rand.New(rand.NewPCG(seed, 1))
			sys := make([]string, 48)
			for g := range sys {
				sys[g] = text(fmt.Sprintf("tenant %02d policy", g), 4000)
			}
			var out []arrival
			for i, at := range poisson(r, n, rate) {
				out = append(out, arrival{at, sys[r.IntN(len(sys))] + fmt.Sprintf(" Question %d: what is %d + %d?", i, r.IntN(100), r.IntN(100)), 32})
			}
			return out
		}}
}

// lowSharing: every prompt unique from its first token (a ShareGPT-like
// control), 1,000 tokens.
func lowSharing(n int, rate float64) workload {
	return workload{"low-sharing", fmt.Sprintf("unique 1,000-token prompts, %d requests at %.0f/s, 32 output tokens", n, rate),
		func(seed uint64) []arrival {
			r := rand.New(rand.NewPCG(seed, 2))
			var out []arrival
			for i, at := range poisson(r, n, rate) {
				out = append(out, arrival{at, text(fmt.Sprintf("unique %d-%d", i, r.Uint64()), 1000), 32})
			}
			return out
		}}
}

// lognormal draws a length with the given median and spread, clipped.
func lognormal(r *rand.Rand, median, sigma float64, lo, hi int) int {
	return min(hi, max(lo, int(median*math.Exp(sigma*r.NormFloat64()))))
}

// mixed: 120 tenants whose system prompts run 300–8,000 tokens (log-normal,
// median 1,500), picked by a Zipf law, and multi-turn sessions: 2–8 turns,
// each resending the conversation so far plus a new user message (median 60
// tokens) after the assistant's reply (median 150); outputs median 64 tokens.
// ShareGPT-like lengths, generated from the seed.
func mixed(n int, rate float64) workload {
	return workload{"mixed", fmt.Sprintf("120 tenants (Zipf) × 300–8,000-token system prompts + 2–8-turn sessions, %d requests at %.0f/s", n, rate),
		func(seed uint64) []arrival {
			r := rand.New(rand.NewPCG(seed, 3))
			sys := make([]string, 120)
			for g := range sys {
				sys[g] = text(fmt.Sprintf("tenant %03d instructions", g), lognormal(r, 1500, 0.8, 300, 8000))
			}
			zipf := rand.NewZipf(r, 1.1, 2, uint64(len(sys)-1))
			type session struct {
				at      time.Duration
				history string
				turns   int
			}
			var live []*session
			var out []arrival
			starts := poisson(r, n, rate/3.5) // a session averages 3.5 turns
			si := 0
			for len(out) < n {
				// The next event: a new session or the next turn of a live one.
				next := -1
				for i, s := range live {
					if next < 0 || s.at < live[next].at {
						next = i
					}
				}
				if si < len(starts) && (next < 0 || starts[si] <= live[next].at) {
					live = append(live, &session{at: starts[si], history: sys[zipf.Uint64()], turns: 2 + r.IntN(7)})
					si++
					continue
				}
				if next < 0 {
					break
				}
				s := live[next]
				s.history += "\nuser: " + text(fmt.Sprintf("q%d", r.Uint64()), lognormal(r, 60, 0.7, 5, 600))
				out = append(out, arrival{s.at, s.history, lognormal(r, 64, 0.6, 8, 256)})
				s.history += "\nassistant: " + text(fmt.Sprintf("a%d", r.Uint64()), lognormal(r, 150, 0.7, 10, 800))
				s.turns--
				s.at += time.Duration(r.ExpFloat64() * 8 * float64(time.Second)) // think time
				if s.turns == 0 {
					live = append(live[:next], live[next+1:]...)
				}
			}
			sort.SliceStable(out, func(i, j int) bool { return out[i].at < out[j].at })
			return out
		}}
}

// event is something that happens at a virtual time: lower seq first on ties.
type event struct {
	at  time.Duration
	seq int
	do  func()
}

type events []event

func (h events) Len() int { return len(h) }
func (h events) Less(i, j int) bool {
	return h[i].at < h[j].at || (h[i].at == h[j].at && h[i].seq < h[j].seq)
}
func (h events) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *events) Push(x any)   { *h = append(*h, x.(event)) }
func (h *events) Pop() any     { old := *h; x := old[len(old)-1]; *h = old[:len(old)-1]; return x }

// simRouter is one router: its picker, its KV index, and the endpoint
// snapshot its watcher last built.
type simRouter struct {
	picker *router.Picker
	kv     *router.KVIndex
	queues *router.Queues // its own prefill queues and the others', as the heads say
	eps    []*router.Endpoint
	seq    []uint64 // per replica: the last KV-event batch applied
}

type result struct {
	p50, p90, p99 time.Duration // TTFT
	tokPerSec     float64       // output tokens / makespan
	hitRate       float64       // prompt tokens served from cache, all replicas
	failed        int
	preemptions   int // all replicas: requests evicted from KV to recompute later
}

// run simulates one strategy on one workload with nRouters routers taking
// turns with the requests.
func run(strategy string, w workload, seed uint64, nRouters int) result {
	p := sim.Presets["llama-8b-h100-tp1"].Params
	p.NumGPUBlocks = 8000 // 128k tokens of KV per replica
	p.BlockSize = blockSize
	engines := make([]*sim.Virtual, replicas)
	addrs := make([]string, replicas)
	for i := range engines {
		engines[i] = sim.NewVirtual(p, hashSeed)
		addrs[i] = fmt.Sprintf("10.0.0.%d:8000", i+1)
	}
	var now time.Duration
	clock := func() time.Time { return time.Unix(1_700_000_000, 0).Add(now) }
	hasher, err := kvhash.NewVLLM(hashSeed, blockSize)
	if err != nil {
		panic(err)
	}
	label := strategy
	if strategy == historyLabel || strategy == noWaitLabel {
		strategy = router.StrategyPrefixCache
	}
	withEvents := label == strategyEvents || label == noWaitLabel
	mayWait := label != noWaitLabel // the router holds what prefix-cache says must wait
	routers := make([]*simRouter, nRouters)
	for i := range routers {
		rt := &simRouter{kv: router.NewKVIndex(0), queues: router.NewQueues(), seq: make([]uint64, replicas)}
		var kv *router.KVIndex
		if withEvents {
			kv = rt.kv
			for _, a := range addrs {
				rt.kv.Reset(a, hasher, nil, 0) // the heads' snapshots: empty caches
			}
		}
		rt.picker = router.NewPicker(clock, seed*31+uint64(i), kv, rt.queues, holdTokens)
		routers[i] = rt
	}
	feed := func() {
		for _, rt := range routers {
			rt.eps = rt.eps[:0]
			for i, e := range engines {
				run, wait, kvu := e.Stats()
				rt.eps = append(rt.eps, &router.Endpoint{Model: "m", Addr: addrs[i], Group: fmt.Sprint(i),
					Running: float64(run), Waiting: float64(wait), KVCache: kvu, HasMetrics: true})
			}
		}
	}
	feed()

	var q events
	n := 0
	at := func(t time.Duration, f func()) { n++; heap.Push(&q, event{t, n, f}) }
	var tick func()
	tick = func() {
		feed()
		if q.Len() > 0 || anyBusy(engines) {
			at(now+metricsEvery, tick)
		}
	}
	at(metricsEvery, tick)

	reqs := w.gen(seed)
	type tracked struct {
		vr      *sim.VirtualRequest
		arrival time.Duration
		lease   router.Lease
		router  int
	}
	byEngine := make([]map[*sim.VirtualRequest]*tracked, replicas)
	for i := range byEngine {
		byEngine[i] = map[*sim.VirtualRequest]*tracked{}
	}
	var ttfts []time.Duration
	var outTokens int
	failed := 0
	var last time.Duration
	// Each router's requests that wait for room, first come first served:
	// the first asks again whenever one of that router's requests gets its
	// first token (the router wakes it then, hold.go), and those behind it
	// follow while they fit.
	held := make([][]int, nRouters)
	toks := make([][]uint32, len(reqs)) // tokenized once, however often picked
	var try func(ri, i int, behind bool) bool
	drain := func(ri int) {
		for len(held[ri]) > 0 && try(ri, held[ri][0], false) {
			held[ri] = held[ri][1:]
		}
	}
	// The routers share their prefill queues through the heads (Queue
	// streams): a router sends each head its counts and how many requests
	// it holds when they change, the latest when it gets to send (the
	// changes of one moment coalesce), and the head passes the others' sums
	// on, queueDelay later. As in hold.go, the others' counts wake a held
	// request only where no other router holds any (none will take the
	// room) or this router has nothing of its own queued (no count-off of
	// its own will come to wake it).
	sending := false
	shareQueues := func() {
		if nRouters == 1 || !withEvents || sending {
			return
		}
		sending = true
		at(now, func() {
			sending = false
			own := make([]map[string]int64, nRouters)
			waits := make([]int, nRouters)
			for ri, rt := range routers {
				own[ri], _ = rt.queues.Own(addrs)
				waits[ri] = len(held[ri]) // the picker's count in the router; here the loop holds them
			}
			at(now+queueDelay, func() {
				for rj, rt := range routers {
					others := map[string]int64{}
					ow := 0
					for ri := range routers {
						if ri != rj {
							ow += waits[ri]
							for a, n := range own[ri] {
								others[a] += n
							}
						}
					}
					rt.queues.SetOthers(addrs, others, int64(ow))
					if mine, _ := rt.queues.Own(addrs); len(mine) == 0 || ow == 0 {
						drain(rj)
					}
				}
			})
		})
	}
	try = func(ri, i int, behind bool) bool {
		a, rt := reqs[i], routers[ri]
		pr := router.PickRequest{Model: "m", Prompt: a.prompt, MayWait: mayWait, Behind: behind}
		delay := time.Duration(0)
		if withEvents {
			if toks[i] == nil {
				toks[i] = sim.Tokenize(a.prompt)
			}
			pr.Tokens, delay = toks[i], tokenizeCost
		}
		ep, _, lease := rt.picker.Pick(strategy, rt.eps, pr)
		if ep == nil {
			return false
		}
		shareQueues()
		k := slices.Index(addrs, ep.Addr)
		at(now+delay, func() {
			vr := engines[k].Submit(now, a.prompt, a.out)
			if vr.Failed {
				failed++
				lease.Done()
				drain(ri)
				return
			}
			byEngine[k][vr] = &tracked{vr: vr, arrival: a.at, lease: lease, router: ri}
		})
		return true
	}
	for i, a := range reqs {
		at(a.at, func() {
			ri := i % nRouters
			if !try(ri, i, len(held[ri]) > 0) {
				held[ri] = append(held[ri], i)
				if len(held[ri]) == 1 {
					shareQueues() // the heads hear that this router holds requests now
				}
			}
		})
	}
	for {
		// The next engine step starts at the earliest busy engine's clock;
		// anything due at or before it happens first.
		k, next := -1, time.Duration(math.MaxInt64)
		for i, e := range engines {
			if e.Busy() && e.Now() < next {
				k, next = i, e.Now()
			}
		}
		if q.Len() > 0 && q[0].at <= next {
			ev := heap.Pop(&q).(event)
			now = ev.at
			ev.do()
			continue
		}
		if k < 0 {
			break
		}
		now = next
		started, finished, evs := engines[k].Step()
		end := engines[k].Now()
		for _, vr := range started {
			tr := byEngine[k][vr]
			at(end, func() { tr.lease.FirstToken(); drain(tr.router); shareQueues() })
		}
		for _, vr := range finished {
			tr := byEngine[k][vr]
			delete(byEngine[k], vr)
			at(end, func() {
				tr.lease.Done()
				if vr.Failed {
					failed++
					return
				}
				ttfts = append(ttfts, vr.First-tr.arrival)
				outTokens += vr.Output
				last = max(last, vr.Done)
			})
		}
		if len(evs) > 0 && withEvents {
			addr := addrs[k]
			at(end+eventDelay, func() {
				for _, rt := range routers {
					rt.seq[k]++
					if !rt.kv.Apply(addr, rt.seq[k], evs) {
						panic("kv events out of order")
					}
				}
				for ri := range routers {
					drain(ri) // a block store may end a prefill: the router wakes its first waiter
				}
				shareQueues()
			})
		}
	}
	sort.Slice(ttfts, func(i, j int) bool { return ttfts[i] < ttfts[j] })
	qt := func(f float64) time.Duration {
		if len(ttfts) == 0 {
			return 0
		}
		return ttfts[int(f*float64(len(ttfts)-1))]
	}
	hits, preempted := 0.0, 0
	for _, e := range engines {
		hits += e.PrefixHitRate()
		preempted += e.Preemptions()
	}
	first := reqs[0].at
	return result{qt(0.5), qt(0.9), qt(0.99), float64(outTokens) / (last - first).Seconds(), hits / replicas, failed, preempted}
}

func anyBusy(es []*sim.Virtual) bool {
	for _, e := range es {
		if e.Busy() {
			return true
		}
	}
	return false
}

var benchStrategies = []string{router.StrategyRoundRobin, router.StrategyRandom, router.StrategyLeastRequest, router.StrategyLeastKV,
	router.StrategyPrefixAIBrix, historyLabel, noWaitLabel, strategyEvents}

// BenchmarkRouting compares strategies against round-robin on a simulated
// 4-replica cluster (llama-8b-h100-tp1 preset, 128k tokens of KV each), at a
// load round-robin cannot keep up with, with one router and with two, for
// three seeds. Times are virtual.
//
//	go test -run '^$' -bench Routing -benchtime 1x ./bench/
func BenchmarkRouting(b *testing.B) {
	seeds := []uint64{1, 2, 3}
	if s := os.Getenv("ROUTING_SEEDS"); s != "" {
		seeds = nil
		for _, f := range strings.Split(s, ",") {
			x, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
			if err != nil {
				b.Fatalf("ROUTING_SEEDS=%q: give seeds as comma-separated numbers (%v)", s, err)
			}
			seeds = append(seeds, x)
		}
	}
	strategies, err := routingStrategies(os.Getenv("ROUTING_STRATEGIES"))
	if err != nil {
		b.Fatal(err)
	}
	if s := os.Getenv("ROUTING_HOLD"); s != "" {
		x, err := strconv.Atoi(s)
		if err != nil || x < -1 {
			b.Fatalf("ROUTING_HOLD=%q: give the routers' --hold-prefill-tokens, a whole number (-1: never hold)", s)
		}
		holdTokens = x
	}
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		scale := 1
		if s := os.Getenv("ROUTING_SCALE"); s != "" {
			x, err := strconv.Atoi(s)
			if err != nil || x < 1 {
				b.Fatalf("ROUTING_SCALE=%q: give a whole number ≥ 1 (it multiplies every workload's request count)", s)
			}
			scale = x
		}
		workloads, err := routingWorkloads(os.Getenv("ROUTING_WORKLOADS"),
			[]workload{sharedPrefix(6000*scale, 20), mixed(4000*scale, 10), lowSharing(2000*scale, 14)})
		if err != nil {
			b.Fatal(err)
		}
		for _, w := range workloads {
			for _, nr := range []int{1, 2} {
				for _, seed := range seeds {
					fmt.Fprintf(os.Stdout, "\nworkload %s, %d router(s), seed %d: %s\n", w.name, nr, seed, w.shape)
					fmt.Fprintf(os.Stdout, "%-24s %8s %8s %8s %10s %6s %5s %8s %11s %12s %12s\n", "strategy", "TTFT p50", "p90", "p99",
						"out tok/s", "hit %", "fail", "preempt", "tput vs RR", "p90 RR/this", "p99 RR/this")
					var base result
					for _, s := range strategies {
						r := run(s, w, seed, nr)
						if s == router.StrategyRoundRobin {
							base = r
						}
						fmt.Fprintf(os.Stdout, "%-24s %7.2fs %7.2fs %7.2fs %10.0f %6.1f %5d %8d %10.2fx %11.2fx %11.2fx\n", s, r.p50.Seconds(),
							r.p90.Seconds(), r.p99.Seconds(), r.tokPerSec, 100*r.hitRate, r.failed, r.preemptions, r.tokPerSec/base.tokPerSec,
							base.p90.Seconds()/r.p90.Seconds(), base.p99.Seconds()/r.p99.Seconds())
					}
				}
			}
		}
	}
}

// routingStrategies is ROUTING_STRATEGIES (comma-separated names; empty:
// all of benchStrategies), with round-robin first: it is what every row is
// measured against.
func routingStrategies(env string) ([]string, error) {
	if strings.TrimSpace(env) == "" {
		return benchStrategies, nil
	}
	names, err := envNames("ROUTING_STRATEGIES", env, benchStrategies)
	if err != nil {
		return nil, err
	}
	return append([]string{router.StrategyRoundRobin}, slices.DeleteFunc(names, func(n string) bool { return n == router.StrategyRoundRobin })...), nil
}

// routingWorkloads is ROUTING_WORKLOADS (comma-separated names; empty: all).
func routingWorkloads(env string, all []workload) ([]workload, error) {
	if strings.TrimSpace(env) == "" {
		return all, nil
	}
	known := make([]string, len(all))
	for i, w := range all {
		known[i] = w.name
	}
	names, err := envNames("ROUTING_WORKLOADS", env, known)
	if err != nil {
		return nil, err
	}
	var out []workload
	for _, n := range names {
		out = append(out, all[slices.Index(known, n)])
	}
	return out, nil
}

// envNames reads a comma-separated list of names from the variable key,
// each once, in the order given; a name not in known is an error that says
// which names are.
func envNames(key, env string, known []string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(env, ",") {
		f = strings.TrimSpace(f)
		if !slices.Contains(known, f) {
			return nil, fmt.Errorf("%s=%q: %q is not one of %s", key, env, f, strings.Join(known, ", "))
		}
		if !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out, nil
}

// TestRoutingSimulationRepeats: the simulation is a function of its seed
// (what makes the benchmark's table repeat), and a different seed is a
// different run.
func TestRoutingSimulationRepeats(t *testing.T) {
	w := sharedPrefix(300, 20)
	a, b := run(strategyEvents, w, 7, 2), run(strategyEvents, w, 7, 2)
	if a != b {
		t.Fatalf("same seed, different results: %+v vs %+v", a, b)
	}
	if c := run(strategyEvents, w, 8, 2); c == a {
		t.Fatalf("another seed gave the very same run: %+v", c)
	}
	if a.failed != 0 || a.tokPerSec <= 0 || a.hitRate <= 0 {
		t.Fatalf("a run that did not run: %+v", a)
	}
}

// TestRoutingStrategies: ROUTING_STRATEGIES picks a subset with round-robin
// first, and a name the benchmark does not run is refused by name.
func TestRoutingStrategies(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want []string
		err  bool
	}{
		{env: "", want: benchStrategies},
		{env: " prefix-cache , prefix-cache-aibrix,prefix-cache", want: []string{router.StrategyRoundRobin, router.StrategyPrefixCache, router.StrategyPrefixAIBrix}},
		{env: "round-robin", want: []string{router.StrategyRoundRobin}},
		{env: "prefix-cache,fastest", err: true},
		{env: "prefix-cache,round-robin", want: []string{router.StrategyRoundRobin, router.StrategyPrefixCache}},
	} {
		got, err := routingStrategies(tc.env)
		if tc.err {
			if err == nil || !strings.Contains(err.Error(), `"fastest" is not one of`) {
				t.Fatalf("%q: want an error naming the bad strategy, got %v, %v", tc.env, got, err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Fatalf("%q: got %v, %v; want %v", tc.env, got, err, tc.want)
		}
	}
}

// TestRoutingWorkloads: ROUTING_WORKLOADS picks workloads in the order
// given, and a misspelt name is refused with the names there are (it used to
// run nothing and say nothing).
func TestRoutingWorkloads(t *testing.T) {
	all := []workload{sharedPrefix(10, 1), mixed(10, 1), lowSharing(10, 1)}
	got, err := routingWorkloads(" low-sharing,shared-prefix,low-sharing", all)
	if err != nil || len(got) != 2 || got[0].name != "low-sharing" || got[1].name != "shared-prefix" {
		t.Fatalf("got %v, %v; want low-sharing then shared-prefix", got, err)
	}
	if got, err := routingWorkloads("", all); err != nil || len(got) != 3 {
		t.Fatalf("empty: got %d workloads, %v; want all 3", len(got), err)
	}
	_, err = routingWorkloads("low-sharng", all)
	if err == nil || !strings.Contains(err.Error(), `"low-sharng" is not one of shared-prefix, mixed, low-sharing`) {
		t.Fatalf("a misspelt workload: want an error listing the names, got %v", err)
	}
}
