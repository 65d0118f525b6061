package runner

import (
	"strconv"
	"time"

	"github.com/shoalhq/shoal/engine"
)

// Metrics are a ready head's recent engine figures, as the Replica API
// reports them.
type Metrics struct {
	// Have is false until /metrics was first read (rates need a second read).
	Have            bool
	Running         float64
	Waiting         float64
	KVCache         float64 // 0-1
	TokensPerSecond float64
	TTFTAvg         float64 // seconds, over the last interval
	PrefixHitRate   float64 // 0-1, over the last interval
	// Ranks are a data-parallel group's DP ranks as routers address them
	// (hybrid and external load balancing); nil otherwise.
	Ranks []RankMetrics
	// LoRAActive are the adapters with requests running or waiting.
	LoRAActive []string
}

// RankMetrics is one DP rank: the API server that fronts it, whether
// requests pin it there (vLLM's X-data-parallel-rank), and its load.
type RankMetrics struct {
	Rank                      int
	Addr                      string
	Pin                       bool
	Running, Waiting, KVCache float64
}

// rankView lists every rank of servers with its load from the last read;
// nil when the group has a single server that balances its ranks itself.
func rankView(servers []engine.APIServer, last engine.Metrics) []RankMetrics {
	if len(servers) < 2 && (len(servers) == 0 || !servers[0].PinRanks) {
		return nil
	}
	var out []RankMetrics
	for _, s := range servers {
		for r := s.FirstRank; r < s.FirstRank+s.Ranks; r++ {
			l := last.Ranks[strconv.Itoa(r)]
			out = append(out, RankMetrics{Rank: r, Addr: s.Addr, Pin: s.PinRanks, Running: l.Running, Waiting: l.Waiting, KVCache: l.KVCacheUsage})
		}
	}
	return out
}

// metricsState turns successive /metrics reads into rates and progress.
type metricsState struct {
	last     engine.Metrics
	lastAt   time.Time
	have     bool
	progress time.Time // last time tokens were generated, or nothing was running
	lastGen  time.Time // last time tokens were generated
	tokPerS  float64
	ttftAvg  float64
	hitRate  float64
}

// observe records a read of the engine's counters taken at now.
func (ms *metricsState) observe(m engine.Metrics, now time.Time) {
	if ms.have {
		if dt := now.Sub(ms.lastAt).Seconds(); dt > 0 {
			ms.tokPerS = max(0, m.GenerationTokens-ms.last.GenerationTokens) / dt
		}
		if dn := m.TTFTCount - ms.last.TTFTCount; dn > 0 {
			ms.ttftAvg = (m.TTFTSum - ms.last.TTFTSum) / dn
		}
		if dq := m.PrefixQueries - ms.last.PrefixQueries; dq > 0 {
			ms.hitRate = (m.PrefixHits - ms.last.PrefixHits) / dq
		}
	}
	generated := ms.have && m.GenerationTokens > ms.last.GenerationTokens
	if !ms.have || m.Running+m.Waiting == 0 || generated {
		ms.progress = now
	}
	if generated {
		ms.lastGen = now
	}
	ms.last, ms.lastAt, ms.have = m, now, true
}

// idleSince: nothing runs or waits, and no token was generated since t
// (traffic exercises the engine already; a canary is needed only when idle).
func (ms *metricsState) idleSince(t time.Time) bool {
	return ms.have && ms.last.Running+ms.last.Waiting == 0 && !ms.lastGen.After(t)
}

// stalled is how long the engine has had requests running or waiting without
// generating a token, once that exceeds hang (else 0).
func (ms *metricsState) stalled(now time.Time, hang time.Duration) time.Duration {
	if hang <= 0 || !ms.have || ms.progress.IsZero() {
		return 0
	}
	if d := now.Sub(ms.progress); d > hang {
		return d
	}
	return 0
}

func (ms *metricsState) view() Metrics {
	if !ms.have {
		return Metrics{}
	}
	return Metrics{Have: true, Running: ms.last.Running, Waiting: ms.last.Waiting, KVCache: ms.last.KVCacheUsage,
		TokensPerSecond: ms.tokPerS, TTFTAvg: ms.ttftAvg, PrefixHitRate: ms.hitRate, LoRAActive: ms.last.LoRAActive}
}
