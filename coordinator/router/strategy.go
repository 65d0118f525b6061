package router

import (
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// Strategies a request may ask for in the routing-strategy header.
const (
	StrategyRandom       = "random"
	StrategyLeastRequest = "least-request"
)

// DefaultStrategy is used when the header is absent.
const DefaultStrategy = StrategyLeastRequest

// Strategies lists the supported strategies.
var Strategies = []string{StrategyRandom, StrategyLeastRequest}

// inflight counts requests this router has open per backend address.
type inflight struct {
	mu sync.Mutex
	m  map[string]*atomic.Int64 // guarded by mu
}

func (f *inflight) counter(addr string) *atomic.Int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.m[addr]
	if !ok {
		c = &atomic.Int64{}
		f.m[addr] = c
	}
	return c
}

// pick chooses an endpoint, skipping those in exclude.
func (r *Router) pick(strategy string, eps []*Endpoint, exclude map[string]bool) *Endpoint {
	cands := make([]*Endpoint, 0, len(eps))
	for _, e := range eps {
		if !exclude[e.Addr] {
			cands = append(cands, e)
		}
	}
	if len(cands) == 0 {
		return nil
	}
	switch strategy {
	case StrategyRandom:
		return cands[rand.IntN(len(cands))]
	default: // least-request
		// This router's own open requests decide (exact and current); the
		// engine's reported queue breaks ties (covers other routers' load);
		// random among equals so equal replicas share the load.
		type scored struct {
			e    *Endpoint
			open int64
			load float64
		}
		s := make([]scored, len(cands))
		for i, e := range cands {
			s[i] = scored{e, r.inflight.counter(e.Addr).Load(), e.Running + e.Waiting}
		}
		rand.Shuffle(len(s), func(i, j int) { s[i], s[j] = s[j], s[i] })
		sort.SliceStable(s, func(i, j int) bool {
			if s[i].open != s[j].open {
				return s[i].open < s[j].open
			}
			return s[i].load < s[j].load
		})
		return s[0].e
	}
}

func validStrategy(s string) bool {
	for _, x := range Strategies {
		if s == x {
			return true
		}
	}
	return false
}

func strategyList() string { return strings.Join(Strategies, ", ") }
