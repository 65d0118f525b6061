package router

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func eps(n int, mod func(i int, e *Endpoint)) []*Endpoint {
	var out []*Endpoint
	for i := 0; i < n; i++ {
		e := &Endpoint{Model: "m", Addr: fmt.Sprintf("10.0.0.%d:8000", i+1), HasMetrics: true}
		if mod != nil {
			mod(i, e)
		}
		out = append(out, e)
	}
	return out
}

func TestRoundRobinAndRandom(t *testing.T) {
	p := newPicker()
	es := eps(3, nil)
	var got []string
	for i := 0; i < 6; i++ {
		e, used, rel := p.pick(StrategyRoundRobin, es, hint{model: "m"}, nil)
		rel.release()
		require.Equal(t, StrategyRoundRobin, used)
		got = append(got, e.Addr)
	}
	require.Equal(t, got[:3], got[3:])
	require.Len(t, map[string]bool{got[0]: true, got[1]: true, got[2]: true}, 3)
	seen := map[string]bool{}
	for i := 0; i < 200; i++ {
		e, _, rel := p.pick(StrategyRandom, es, hint{}, nil)
		rel.release()
		seen[e.Addr] = true
	}
	require.Len(t, seen, 3)
}

// TestLeastRequestNoPileUp: a burst of concurrent picks (none finished yet)
// spreads evenly because a pick and its increment are one step (AIBrix #2422).
func TestLeastRequestNoPileUp(t *testing.T) {
	p := newPicker()
	es := eps(4, nil)
	var mu sync.Mutex
	count := map[string]int{}
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e, _, _ := p.pick(StrategyLeastRequest, es, hint{}, nil) // never released: all in flight
			mu.Lock()
			count[e.Addr]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, e := range es {
		require.Equal(t, 25, count[e.Addr])
	}
	// The head's reported queue counts too (other routers' load).
	p2 := newPicker()
	es2 := eps(2, func(i int, e *Endpoint) {
		if i == 0 {
			e.Waiting = 10
		}
	})
	e, _, rel := p2.pick(StrategyLeastRequest, es2, hint{}, nil)
	rel.release()
	require.Equal(t, es2[1].Addr, e.Addr)
}

func TestMetricStrategiesAndFallback(t *testing.T) {
	p := newPicker()
	es := eps(3, func(i int, e *Endpoint) {
		e.KVCache = []float64{0.9, 0.2, 0.5}[i]
		e.TTFT = []float64{0.1, 0.5, 0.05}[i]
		e.TokPerSec = []float64{300, 100, 200}[i]
	})
	for s, want := range map[string]int{StrategyLeastKV: 1, StrategyLeastLatency: 2, StrategyThroughput: 1} {
		e, used, rel := p.pick(s, es, hint{}, nil)
		rel.release()
		require.Equal(t, es[want].Addr, e.Addr, s)
		require.Equal(t, s, used)
	}
	// No metrics anywhere: least-request decides, and the caller is told.
	bare := eps(2, func(i int, e *Endpoint) { e.HasMetrics = false })
	for _, s := range []string{StrategyLeastKV, StrategyLeastLatency, StrategyThroughput} {
		_, used, rel := p.pick(s, bare, hint{}, nil)
		rel.release()
		require.Equal(t, StrategyLeastRequest, used, s)
	}
}

func TestPrefixCacheStickyAndBounded(t *testing.T) {
	p := newPicker()
	es := eps(4, nil)
	text := strings.Repeat("You are a helpful assistant. ", 40)
	sys := hint{prefix: prefixHashes(text, 1024), promptTokens: estimateTokens(text)}
	first, _, rel := p.pick(StrategyPrefixCache, es, sys, nil)
	rel.release()
	for i := 0; i < 5; i++ {
		e, used, rel := p.pick(StrategyPrefixCache, es, sys, nil)
		rel.release()
		require.Equal(t, first.Addr, e.Addr, "same prefix, same replica")
		require.Equal(t, StrategyPrefixCache, used)
	}
	// A hot prefix with everything in flight: the replica that has it takes
	// requests until the prefill queued on it outweighs four times what the
	// prefix saves (cost 4·(P−hit) + queued), then the others share it.
	count := map[string]int{}
	var order []string
	for i := 0; i < 100; i++ {
		e, _, _ := p.pick(StrategyPrefixCache, es, sys, nil)
		count[e.Addr]++
		order = append(order, e.Addr)
	}
	saved, miss := 256, sys.promptTokens-256 // 8 history blocks of 128 bytes ≈ 256 tokens
	stick := (4*sys.promptTokens-4*miss)/miss + 1
	for i := 0; i < stick; i++ {
		require.Equal(t, first.Addr, order[i], "pick %d: the cached replica's queue is still shorter than the prefix saves (%d tokens)", i, saved)
	}
	require.NotEqual(t, first.Addr, order[stick], "then it spreads")
	require.GreaterOrEqual(t, len(count), 3, "the hot prefix spread: %v", count)
	require.Less(t, count[first.Addr], 70, "%v", count)
}

func TestPrefixAIBrixRule(t *testing.T) {
	p := newPicker()
	es := eps(3, nil)
	h := hint{prefix: prefixHashes(strings.Repeat("x", 1024), 1024)}
	first, used, rel := p.pick(StrategyPrefixAIBrix, es, h, nil)
	rel.release()
	require.Equal(t, StrategyPrefixAIBrix, used)
	e, _, rel := p.pick(StrategyPrefixAIBrix, es, h, nil)
	rel.release()
	require.Equal(t, first.Addr, e.Addr)
	// Imbalance over 16 running: least-request instead.
	for i := 0; i < 17; i++ {
		p.mu.Lock()
		p.counter(first.Addr).Add(1)
		p.mu.Unlock()
	}
	e, used, rel = p.pick(StrategyPrefixAIBrix, es, h, nil)
	rel.release()
	require.NotEqual(t, first.Addr, e.Addr)
	require.Equal(t, StrategyLeastRequest, used)
}

func TestSessionAndEjection(t *testing.T) {
	p := newPicker()
	es := eps(3, nil)
	h := hint{session: "user-42"}
	first, _, rel := p.pick(StrategySession, es, h, nil)
	rel.release()
	for i := 0; i < 5; i++ {
		e, _, rel := p.pick(StrategySession, es, h, nil)
		rel.release()
		require.Equal(t, first.Addr, e.Addr)
	}
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	p.eject(first.Addr, 5*time.Second)
	e, _, rel := p.pick(StrategySession, es, h, nil)
	rel.release()
	require.NotEqual(t, first.Addr, e.Addr, "an ejected replica is skipped")
	now = now.Add(6 * time.Second)
	e2, _, rel := p.pick(StrategySession, es, h, nil)
	rel.release()
	require.Equal(t, e.Addr, e2.Addr, "the session stays where it moved")
	// Everything ejected: still serve.
	for _, x := range es {
		p.eject(x.Addr, time.Hour)
	}
	e, _, rel = p.pick(StrategyRandom, es, hint{}, nil)
	rel.release()
	require.NotNil(t, e)
}

func TestLRU(t *testing.T) {
	c := newLRU(2)
	c.put("a", "1")
	c.put("b", "2")
	_, _ = c.get("a")
	c.put("c", "3")
	_, ok := c.get("b")
	require.False(t, ok, "least recently used is evicted")
	v, ok := c.get("a")
	require.True(t, ok)
	require.Equal(t, "1", v)
}

// TestEjectionWindow: an ejected replica is left out of picks until its
// ejection ends (on the injected clock), unless every replica is ejected.
func TestEjectionWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	for _, c := range []struct {
		name    string
		at      time.Duration
		all     bool // every replica ejected
		skipped bool
	}{
		{"during the ejection", 4900 * time.Millisecond, false, true},
		{"when it ends", 5 * time.Second, false, false},
		{"after it ended", time.Minute, false, false},
		{"every replica ejected: still picked", time.Second, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := newPicker()
			now := t0
			p.now = func() time.Time { return now }
			es := eps(2, nil)
			p.eject(es[0].Addr, 5*time.Second)
			if c.all {
				p.eject(es[1].Addr, 5*time.Second)
			}
			now = t0.Add(c.at)
			seen := map[string]bool{}
			for i := 0; i < 20; i++ {
				e, _, rel := p.pick(StrategyRoundRobin, es, hint{model: "m"}, nil)
				rel.release()
				seen[e.Addr] = true
			}
			require.Equal(t, c.skipped, !seen[es[0].Addr])
		})
	}
}

// TestPrefixCostWithoutHits: a prompt cached nowhere goes round-robin, but
// never to a replica whose queued prefill is 16 prompts longer than the
// shortest (a straggler), and a replica that holds the prompt wins over that.
func TestPrefixCostWithoutHits(t *testing.T) {
	p := newPicker()
	es := eps(3, nil)
	h := hint{model: "m", promptTokens: 100}
	var got []string
	for i := 0; i < 6; i++ {
		e, _, _ := p.pick(StrategyPrefixCache, es, h, nil) // never released: prefill stays queued
		got = append(got, e.Addr)
	}
	require.Equal(t, []string{es[0].Addr, es[1].Addr, es[2].Addr, es[0].Addr, es[1].Addr, es[2].Addr}, got, "turns, as round-robin")
	p.mu.Lock()
	p.pending[es[1].Addr] += 17 * 100
	p.mu.Unlock()
	for i := 0; i < 4; i++ {
		e, _, l := p.pick(StrategyPrefixCache, es, h, nil)
		l.release()
		require.NotEqual(t, es[1].Addr, e.Addr, "the straggler is skipped")
	}
	// A replica with a queue that holds the prompt (history) wins while its
	// queue is shorter than four times what the prefix saves.
	p = newPicker()
	text := strings.Repeat("x", 1024) // 8 blocks ≈ 256 tokens
	cached := hint{model: "m", prefix: prefixHashes(text, 1024), promptTokens: 300}
	p.prefix.add(cached.prefix, es[1].Addr)
	p.pending[es[1].Addr] = 900 // 4·(300−256) + 900 = 1076 < 4·300
	e, _, l := p.pick(StrategyPrefixCache, es, cached, nil)
	l.release()
	require.Equal(t, es[1].Addr, e.Addr)
	p.pending[es[1].Addr] = 1100 // 1276 > 1200: the queue outweighs the prefix
	e, _, l = p.pick(StrategyPrefixCache, es, cached, nil)
	l.release()
	require.NotEqual(t, es[1].Addr, e.Addr)
}
