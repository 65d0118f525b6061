package bench

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine/sim"
)

// BenchmarkWideEP compares, on the simulator with the same 16 GPUs and the
// same DeepSeek-R1-like workload (2k prompt tokens, 1k output tokens,
// Poisson arrivals at equal request rates), the seed's TP8 × PP2 replica
// against a DP16 × EP group (deploy/deepseek-r1-wide-ep.yaml), and, for
// hybrid load balancing, routing to every rank (shoal's per-rank
// endpoints) against routing to the head's API server only (the 8 ranks
// of its node). Virtual time: exact and repeatable on any machine.
//
//	go test -run '^$' -bench WideEP -benchtime 1x ./bench/
func BenchmarkWideEP(b *testing.B) {
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		const gpus, prompt, output = 16, 2048, 1024
		tp := sim.Group{Params: sim.Presets["deepseek-r1-h200-tp8pp2"].Params, Ranks: 1}
		ep := sim.Presets["deepseek-r1-h200-dp-ep"]
		p := ep.Params
		p.EP = &sim.EPCost{Nodes: 2, A2ALatency: ep.EP.A2ALatency, A2APerToken: ep.EP.A2APerToken, Imbalance: 1}
		dp := sim.Group{Params: p, Ranks: 16}
		headOnly := sim.Group{Params: p, Ranks: 16, Eligible: []int{0, 1, 2, 3, 4, 5, 6, 7}}
		ms := func(d time.Duration) string { return fmt.Sprintf("%.0fms", float64(d)/1e6) }
		fmt.Fprintf(os.Stdout, "\nTP8×PP2 (preset %s) vs DP16×EP (preset %s, EPLB, 2 nodes); %d GPUs, %d in / %d out\n",
			"deepseek-r1-h200-tp8pp2", ep.Name, gpus, prompt, output)
		fmt.Fprintf(os.Stdout, "%-8s %-14s %-14s %-7s %-12s %-12s %-7s %-12s %-12s\n", "req/s", "TP8PP2 tok/s/GPU", "DP16EP tok/s/GPU", "ratio",
			"TP8PP2 ITLp99", "DP16EP ITLp99", "ratio", "TP8PP2 TTFTp99", "DP16EP TTFTp99")
		for _, rate := range []float64{0.5, 1, 2, 8, 24} {
			n := int(max(200, rate*60))
			a := sim.SimulateOpenLoop(tp, rate, prompt, output, n, 1)
			c := sim.SimulateOpenLoop(dp, rate, prompt, output, n, 1)
			fmt.Fprintf(os.Stdout, "%-8.1f %-16.0f %-16.0f %-7.2f %-13s %-13s %-7.2f %-14s %-14s\n", rate, a.OutTokPerSec/gpus, c.OutTokPerSec/gpus,
				c.OutTokPerSec/a.OutTokPerSec, ms(a.ITLP99), ms(c.ITLP99), float64(c.ITLP99)/float64(a.ITLP99), ms(a.TTFTP99), ms(c.TTFTP99))
		}
		fmt.Fprintf(os.Stdout, "\nDP16×EP hybrid LB: every rank (per-rank endpoints) vs the head's server only (8 ranks)\n")
		fmt.Fprintf(os.Stdout, "%-8s %-16s %-16s %-7s %-14s %-14s %-7s %-14s %-14s\n", "req/s", "ranks tok/s/GPU", "head tok/s/GPU", "ratio",
			"ranks ITLp99", "head ITLp99", "ratio", "ranks TTFTp99", "head TTFTp99")
		for _, rate := range []float64{4, 8, 16, 24} {
			n := int(max(200, rate*60))
			a := sim.SimulateOpenLoop(dp, rate, prompt, output, n, 2)
			c := sim.SimulateOpenLoop(headOnly, rate, prompt, output, n, 2)
			fmt.Fprintf(os.Stdout, "%-8.1f %-16.0f %-16.0f %-7.2f %-14s %-14s %-7.2f %-14s %-14s\n", rate, a.OutTokPerSec/gpus, c.OutTokPerSec/gpus,
				a.OutTokPerSec/c.OutTokPerSec, ms(a.ITLP99), ms(c.ITLP99), float64(c.ITLP99)/float64(a.ITLP99), ms(a.TTFTP99), ms(c.TTFTP99))
		}
		// The preset against the figure it was fitted to: a full batch of
		// 256 sequences whose context goes from 2.5k to 3.5k tokens while
		// they decode (3k on average); the median inter-token gap is the
		// decode step, and 256 / step the rank's output rate.
		cal := sim.SimulateOpenLoop(sim.Group{Params: p, Ranks: 1}, 1e6, 2500, 1000, ep.PubDecodeSeqs, 3)
		fmt.Fprintf(os.Stdout, "\ncalibration: one DP+EP rank, %d sequences decoding at ~%d tokens of context: step %s, %.0f tok/s per GPU (published ~%.0f per H200; ratio %.2f)\n",
			ep.PubDecodeSeqs, ep.PubContext, ms(cal.ITLP50), float64(ep.PubDecodeSeqs)/cal.ITLP50.Seconds(), ep.PubOutTokPerGPU,
			float64(ep.PubDecodeSeqs)/cal.ITLP50.Seconds()/ep.PubOutTokPerGPU)
	}
}
