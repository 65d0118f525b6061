// Package bench holds benchmarks that print ratios against published figures
// or peers measured in the same run. Run with `make bench`.
package bench

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine/sim"
)

// BenchmarkSimPresets prints, for each simulator preset, the simulated TTFT
// and inter-token latency against the published profile it was calibrated
// from, with the ratio per point. Timings are the engine's virtual time, so
// they are exact and repeatable on any machine.
//
//	go test -run '^$' -bench SimPresets ./bench/
func BenchmarkSimPresets(b *testing.B) {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/1e6) }
	ratio := func(sim, pub time.Duration) string {
		if pub == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.2f", float64(sim)/float64(pub))
	}
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		for _, name := range sim.PresetNames() {
			p := sim.Presets[name]
			fmt.Fprintf(os.Stdout, "\n%s — calibrated from: %s\n", name, p.Source)
			fmt.Fprintf(os.Stdout, "%-8s %-6s %-10s %-10s %-6s %-10s %-10s %-6s %-10s %s\n",
				"prompt", "conc", "sim TTFT", "pub TTFT", "ratio", "sim ITL", "pub ITL", "ratio", "out tok/s", "preempt")
			for _, pt := range []struct{ prompt, conc int }{{128, 1}, {1024, 1}, {4096, 1}, {1024, 8}, {1024, max(p.PubMaxSeqs, 16)}, {1024, 256}} {
				r := sim.Simulate(p.Params, pt.prompt, 256, pt.conc, max(4*pt.conc, 8))
				var pubTTFT, pubITL time.Duration
				if p.PubITL > 0 && pt.conc == 1 {
					pubTTFT = p.PubPrefillOverhead + time.Duration(pt.prompt)*p.PubPrefillPerToken
					pubITL = p.PubITL
				}
				if p.PubITL > 0 && pt.conc == p.PubMaxSeqs {
					pubITL = time.Duration(float64(p.PubITL) * p.PubLoadFactor)
				}
				pt2 := func(d time.Duration) string {
					if d == 0 {
						return "-"
					}
					return ms(d)
				}
				fmt.Fprintf(os.Stdout, "%-8d %-6d %-10s %-10s %-6s %-10s %-10s %-6s %-10.0f %d\n", pt.prompt, pt.conc,
					ms(r.TTFTP50), pt2(pubTTFT), ratio(r.TTFTP50, pubTTFT), ms(r.ITLMean), pt2(pubITL), ratio(r.ITLMean, pubITL),
					r.OutputTokPerSec, r.Preemptions)
			}
		}
	}
}
