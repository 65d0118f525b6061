package chaos

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p*float64(len(s)-1) + 0.5)
	return s[i]
}

func secs(ds []time.Duration) string {
	if len(ds) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f / %.2f", pct(ds, 0.5).Seconds(), pct(ds, 0.99).Seconds())
}

// renderReport is the markdown table of a chaos run: per scenario, the
// requests and their fate, the invariant verdicts and the timings (p50 / p99
// over the rounds).
func renderReport(results []result, rounds int, seed int64) string {
	type agg struct {
		runs, sent, ok, failed, unexplained, dual, superseded, other, unconverged int
		detect, stop, recover                                                     []time.Duration
	}
	by := map[string]*agg{}
	var names []string
	for _, r := range results {
		a := by[r.name]
		if a == nil {
			a = &agg{}
			by[r.name] = a
			names = append(names, r.name)
		}
		a.runs++
		a.sent += r.sent
		a.ok += r.ok
		a.failed += r.failed
		a.unexplained += len(r.unexplained)
		a.dual += len(r.dual)
		a.superseded += len(r.superseded)
		a.other += len(r.other)
		if !r.converged {
			a.unconverged++
		}
		if r.detected {
			a.detect = append(a.detect, r.detect) // 0: no request went to the dead head after the fault
		}
		if r.stop > 0 {
			a.stop = append(a.stop, r.stop)
		}
		a.recover = append(a.recover, r.recover)
	}
	sort.Strings(names)
	var b strings.Builder
	fmt.Fprintf(&b, "Chaos run: %d round(s), seed %d, %s. Invariants: 1 one head engine per group, 2 no request to a superseded (group, epoch, term) 1 s after the newer claim, 3 failures only in flight on the failed replica, 4 specs/assignments survive restarts, 5 converged to %d ready replicas.\n\n",
		rounds, seed, time.Now().UTC().Format("2006-01-02 15:04 UTC"), desired)
	b.WriteString("Head out of routing: the last request the router sent to the taken-out head's (group, epoch, term), after the fault (0: none). Head engine stopped: the target group's head vLLM process gone (member death, partition, pause or hang → group stopped). Recovered: from the end of the fault to 2 ready replicas served through the router.\n\n")
	b.WriteString("| scenario | runs | requests sent / ok / failed | inv 1 | inv 2 | inv 3 (unexplained failures) | inv 4 / scenario checks | inv 5 | head out of routing p50/p99 s | head engine stopped p50/p99 s | recovered p50/p99 s |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|\n")
	verdict := func(n int) string {
		if n == 0 {
			return "ok"
		}
		return fmt.Sprintf("**%d**", n)
	}
	for _, n := range names {
		a := by[n]
		fmt.Fprintf(&b, "| %s | %d | %d / %d / %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", n, a.runs, a.sent, a.ok, a.failed,
			verdict(a.dual), verdict(a.superseded), verdict(a.unexplained), verdict(a.other), verdict(a.unconverged),
			secs(a.detect), secs(a.stop), secs(a.recover))
	}
	return b.String()
}
