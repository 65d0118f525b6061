package router

import "time"

// Outlier detection, after Envoy's: a backend is ejected only after
// EjectAfter gateway failures in a row (connection refused or reset before
// an answer, an answer that breaks HTTP, a 5xx), not after one answer; the
// ejection lasts EjectFor times the number of times it was ejected recently
// (capped at maxEjection), and that count falls back by one for every
// EjectFor the backend then serves without an ejection. A success ends the
// streak. A 429 is the engine saying it is full, not failing: it ends
// nothing and counts nothing. When every backend of a model is ejected, the
// picker still uses them (better a suspect replica than none).

// maxEjection caps one ejection.
const maxEjection = 5 * time.Minute

type outlier struct {
	streak   int       // gateway failures in a row
	times    int       // ejections not yet forgiven
	until    time.Time // ejected until
	forgiven time.Time // when times last fell (or the last ejection ended)
}

// outcome records an attempt's result for addr: failed (a gateway failure)
// or not; neutral results (429, client gone) are not recorded. It returns
// how long the backend is now ejected for (0: not ejected by this).
func (p *picker) outcome(addr string, failed bool, after int, base time.Duration) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	o := p.outliers[addr]
	if o == nil {
		if !failed {
			return 0
		}
		o = &outlier{}
		p.outliers[addr] = o
	}
	// Forgive one ejection per base interval served since the last.
	for o.times > 0 && !o.forgiven.IsZero() && now.Sub(o.forgiven) >= base && now.After(o.until) {
		o.times--
		o.forgiven = o.forgiven.Add(base)
	}
	if !failed {
		o.streak = 0
		if o.times == 0 {
			delete(p.outliers, addr)
		}
		return 0
	}
	o.streak++
	if o.streak < after || now.Before(o.until) {
		return 0
	}
	o.streak = 0
	o.times++
	d := min(time.Duration(o.times)*base, maxEjection)
	o.until = now.Add(d)
	o.forgiven = o.until
	p.ejected[addr] = o.until
	return d
}
