package bench

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine/sim"
)

// BenchmarkPDvsColocated compares, on the simulator in virtual time (exact
// and repeatable), prefill/decode disaggregation against colocated
// serving on the same 8 GPUs: 8 one-GPU engines (preset
// llama-8b-h100-tp1) serving requests whole, against P prefill and 8 − P
// decode engines with the KV moved over a 50 GB/s link (one 400 Gb/s NIC)
// and warm pairs. Two workloads, Poisson arrivals at equal request rates:
// long inputs (4096 in / 512 out) and chat (512 in / 256 out). Printed
// per rate: TTFT p99, ITL p99 and goodput (requests/s whose TTFT ≤ 2 s and
// mean inter-token gap ≤ 50 ms) for colocated and for the split with the
// best goodput, and PD/colocated ratios. Then a new pair's first request
// with NIXL's lazy 5 s handshake against warm pairs, and the published
// anchors.
//
//	go test -run '^$' -bench PDvsColocated -benchtime 1x ./bench/
func BenchmarkPDvsColocated(b *testing.B) {
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		pr := sim.Presets["llama-8b-h100-tp1"]
		slo := sim.SLO{TTFT: 2 * time.Second, ITL: 50 * time.Millisecond}
		pd := func(np int) sim.Serving {
			return sim.Serving{Params: pr.Params, Prefill: np, Decode: 8 - np, KVBytesPerToken: pr.KVBytesPerToken, LinkGBps: 50, Hop: time.Millisecond}
		}
		ms := func(d time.Duration) string {
			if d >= 10*time.Second {
				return fmt.Sprintf("%.0fs", d.Seconds())
			}
			return fmt.Sprintf("%.0fms", float64(d)/1e6)
		}
		for _, w := range []struct {
			name    string
			in, out int
			rates   []float64
		}{
			{"long input", 4096, 512, []float64{1, 2, 3, 4, 6}},
			{"chat", 512, 256, []float64{5, 10, 15, 20, 30}},
		} {
			fmt.Fprintf(os.Stdout, "\n%s (%d in / %d out), 8 GPUs (%s), SLO TTFT ≤ %v and mean ITL ≤ %v\n", w.name, w.in, w.out, pr.Name, slo.TTFT, slo.ITL)
			fmt.Fprintf(os.Stdout, "%-6s | %-32s | %-38s | %s\n", "req/s", "colocated ×8: TTFTp99 ITLp99 good", "best PD split: TTFTp99 ITLp99 good", "PD/colocated: TTFTp99 ITLp99 goodput")
			for _, rate := range w.rates {
				l := sim.Load{Rate: rate, Prompt: w.in, Output: w.out, Total: int(max(200, rate*60)), Seed: 1}
				c := sim.SimulateServing(sim.Serving{Params: pr.Params, Colocated: 8}, l, slo)
				var best sim.ServingResult
				bestP := 0
				for np := 1; np <= 6; np++ {
					if d := sim.SimulateServing(pd(np), l, slo); bestP == 0 || d.Goodput > best.Goodput {
						best, bestP = d, np
					}
				}
				ratio := func(a, b float64) string {
					if b == 0 {
						return "∞"
					}
					return fmt.Sprintf("%.2f", a/b)
				}
				fmt.Fprintf(os.Stdout, "%-6.0f | %-9s %-9s %-12.2f | %dP%dD %-9s %-9s %-17.2f | %-7s %-6s %s\n", rate,
					ms(c.TTFTP99), ms(c.ITLP99), c.Goodput, bestP, 8-bestP, ms(best.TTFTP99), ms(best.ITLP99), best.Goodput,
					ratio(float64(best.TTFTP99), float64(c.TTFTP99)), ratio(float64(best.ITLP99), float64(c.ITLP99)), ratio(best.Goodput, c.Goodput))
			}
		}
		lone := sim.Load{Rate: 1, Prompt: 2048, Output: 16, Total: 1, Seed: 1}
		warm := sim.SimulateServing(pd(2), lone, slo)
		lazyS := pd(2)
		lazyS.Handshake = 5 * time.Second
		lazy := sim.SimulateServing(lazyS, lone, slo)
		fmt.Fprintf(os.Stdout, "\nfirst request of a new pair (2048 in): TTFT %s with NIXL's lazy 5 s handshake, %s warm: %.1f×\n",
			ms(lazy.TTFTP50), ms(warm.TTFTP50), float64(lazy.TTFTP50)/float64(warm.TTFTP50))

		// SGLang's 96 H100 (lmsys 2025-05-05): DeepSeek-R1, 3 prefill
		// nodes and 9 decode nodes, 2000-token inputs: 52.3k input tokens/s
		// and 22.3k output tokens/s per node. The wide-EP preset per rank,
		// EP over each role's nodes, each role loaded on its own as they
		// measured it.
		ep := sim.Presets["deepseek-r1-h200-dp-ep"]
		role := func(nodes int) sim.Params {
			p := ep.Params
			p.EP = &sim.EPCost{Nodes: nodes, A2ALatency: ep.EP.A2ALatency, A2APerToken: ep.EP.A2APerToken, Imbalance: 1}
			return p
		}
		pre := sim.SimulateOpenLoop(sim.Group{Params: role(3), Ranks: 24}, 1e6, 2000, 1, 24*40, 4)
		inPerNode := float64(pre.Requests*2000) / pre.Duration.Seconds() / 3
		dec := sim.SimulateOpenLoop(sim.Group{Params: role(9), Ranks: 1}, 1e6, 2000, 100, ep.PubDecodeSeqs, 5)
		outPerNode := float64(ep.PubDecodeSeqs) / dec.ITLP50.Seconds() * 8
		fmt.Fprintf(os.Stdout, "\nanchor SGLang 96×H100 PD (3P + 9D nodes, DeepSeek-R1, 2000 in), preset %s per rank:\n", ep.Name)
		fmt.Fprintf(os.Stdout, "prefill %.1fk input tok/s per node (published 52.3k: ratio %.2f)   decode %.1fk output tok/s per node at %d seqs/rank (published 22.3k: ratio %.2f)\n",
			inPerNode/1e3, inPerNode/52.3e3, outPerNode/1e3, ep.PubDecodeSeqs, outPerNode/22.3e3)
	}
}
