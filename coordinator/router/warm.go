package router

import (
	"context"
	"encoding/json"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Warm pairs for the routers fed by the heads (the coordinator's and
// `shoal router --join`): an endpoint of a disaggregated model that joins
// while others of its role serve is held out of the table until it has
// been through the connector's handshake with every endpoint of the other
// role (one tiny request per pair, Router.warm), so no user request pays
// the handshake (about 5 s per new pair with NIXL). An endpoint with no
// warmed peer of its role is let in at once: holding it would leave the
// model with nothing to serve on. Each router warms on its own, keeping
// no state another router needs; the engines remember a pair, so a second
// router's warm-up of it is a cheap request.

// WarmTimeout bounds one pair's warm-up; a pair that fails or times out is
// let in (its first request pays the handshake) and logged.
const WarmTimeout = 30 * time.Second

// pairKey names a (prefill, decode) pair of endpoints, each by address,
// rank and incarnation (group, epoch, term: a re-formed or restarted
// engine is a new NIXL agent, handshaken anew).
type pairKey struct{ p, d string }

func warmKey(e *Endpoint) string {
	return e.ID() + "|" + e.Group + "|" + strconv.FormatUint(e.Epoch, 10) + "." + strconv.FormatUint(e.Term, 10)
}

// Warmer gates snapshots on warmed pairs. It owns its warm-up goroutines
// (Close stops them).
type Warmer struct {
	r        *Router
	onChange func()
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	sem      chan struct{} // bounds the warm-ups in flight
	outcomes *prometheus.CounterVec
	held     prometheus.Gauge

	mu       sync.Mutex
	pairs    map[pairKey]bool // guarded by mu; false: warming, true: done (warmed or given up)
	admitted map[string]bool  // guarded by mu; endpoints let in (by warmKey)
}

// NewWarmer returns a warmer that sends its warm-ups through r and calls
// onChange when a pair is done (the caller then rebuilds its snapshot
// through Gate).
func (r *Router) NewWarmer(onChange func()) *Warmer {
	ctx, cancel := context.WithCancel(context.Background())
	w := &Warmer{r: r, onChange: onChange, ctx: ctx, cancel: cancel, sem: make(chan struct{}, 32), pairs: map[pairKey]bool{}, admitted: map[string]bool{},
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_router_pair_warmups_total",
			Help: "Prefill/decode pairs warmed before their endpoints took requests, by outcome (ok, failed)."}, []string{"outcome"}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{Name: "shoal_router_endpoints_warming",
			Help: "Endpoints of disaggregated models held out of routing until their pairs are warmed."})}
	r.cfg.Registry.MustRegister(w.outcomes, w.held)
	return w
}

// Close stops the warm-ups in flight and waits for them.
func (w *Warmer) Close() {
	w.cancel()
	w.wg.Wait()
}

// Gate returns s without the endpoints still warming and starts the
// warm-ups of pairs it has not seen. A new endpoint is let in once its
// pairs with every endpoint of the other role already let in are done
// (warmed, or given up); once in, it stays in. Two endpoints let in at
// about the same time may still be warming their own pair: that pair's
// first request can pay the handshake.
func (w *Warmer) Gate(s *Snapshot) *Snapshot {
	out := &Snapshot{byModel: make(map[string][]*Endpoint, len(s.byModel)), known: s.known, adapters: s.adapters}
	livePairs, liveEps := map[pairKey]bool{}, map[string]bool{}
	held := 0
	w.mu.Lock()
	for model, eps := range s.byModel {
		prefills, decodes, pd := splitRoles(eps)
		if !pd {
			out.byModel[model] = eps
			continue
		}
		pk, dk := keys(prefills), keys(decodes)
		for i, p := range prefills {
			for j, d := range decodes {
				k := pairKey{pk[i], dk[j]}
				livePairs[k] = true
				if _, seen := w.pairs[k]; !seen && w.ctx.Err() == nil { // none after Close
					w.pairs[k] = false
					w.start(k, model, p, d)
				}
			}
		}
		was := func(k string) bool { return w.admitted[k] }
		// admit lets in the endpoints of one role (ks their keys; others
		// the keys of the other role, as they stood before this pass).
		admit := func(eps []*Endpoint, ks, others []string, pair func(a, b string) pairKey) []*Endpoint {
			some := slices.ContainsFunc(ks, was)
			var in []*Endpoint
			for i, e := range eps {
				liveEps[ks[i]] = true
				ok := was(ks[i]) || !some
				if !ok {
					ok = true
					for _, o := range others {
						if was(o) && !w.pairs[pair(ks[i], o)] {
							ok = false
							break
						}
					}
				}
				if !ok {
					held++
					continue
				}
				in = append(in, e)
			}
			return in
		}
		inP := admit(prefills, pk, dk, func(a, b string) pairKey { return pairKey{a, b} })
		inD := admit(decodes, dk, pk, func(a, b string) pairKey { return pairKey{b, a} })
		for _, l := range [][]*Endpoint{inP, inD} {
			for _, e := range l {
				w.admitted[warmKey(e)] = true
			}
		}
		l := append(inP, inD...)
		sort.Slice(l, func(i, j int) bool { return l[i].Addr < l[j].Addr })
		out.byModel[model] = l
	}
	for k := range w.pairs {
		if !livePairs[k] {
			delete(w.pairs, k) // an endpoint left: forget its pairs
		}
	}
	for k := range w.admitted {
		if !liveEps[k] {
			delete(w.admitted, k)
		}
	}
	w.mu.Unlock()
	w.held.Set(float64(held))
	return out
}

func keys(eps []*Endpoint) []string {
	out := make([]string, len(eps))
	for i, e := range eps {
		out[i] = warmKey(e)
	}
	return out
}

// start warms one pair in the background. Caller holds w.mu.
func (w *Warmer) start(k pairKey, model string, p, d *Endpoint) {
	body, _ := json.Marshal(map[string]any{"model": model, "prompt": warmPrompt, "max_tokens": 1})
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		select {
		case w.sem <- struct{}{}:
		case <-w.ctx.Done():
			return
		}
		ctx, cancel := context.WithTimeout(w.ctx, WarmTimeout)
		start := time.Now()
		err := w.r.warm(ctx, p, d, body)
		cancel()
		<-w.sem
		if w.ctx.Err() != nil {
			return
		}
		if err != nil {
			w.outcomes.WithLabelValues("failed").Inc()
			w.r.log.Warn("prefill/decode pair not warmed: its first request pays the connector's handshake", "err", err)
		} else {
			w.outcomes.WithLabelValues("ok").Inc()
			w.r.log.Info("prefill/decode pair warmed", "prefill", p.ID(), "decode", d.ID(), "took", time.Since(start).Round(time.Millisecond))
		}
		w.mu.Lock()
		_, still := w.pairs[k]
		if still {
			w.pairs[k] = true
		}
		w.mu.Unlock()
		if still {
			w.onChange()
		}
	}()
}
