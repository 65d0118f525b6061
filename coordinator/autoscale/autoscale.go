// Package autoscale decides how many replicas a deployment should have from
// its heads' metrics. The decision is a pure function of the observations and
// the clock fed to it (Scaler keeps only the sliding windows), so every
// behaviour is table-tested with an injected time; a thin loop in the
// coordinator feeds it about every 2 s and acts on its answer.
package autoscale

import (
	"fmt"
	"math"
	"time"

	"github.com/shoalhq/shoal/spec"
)

// Observation is one tick's view of a deployment.
type Observation struct {
	// Current is how many replica groups exist (ready or forming).
	Current int
	// Ready is how many of them serve. A replica still forming carries no
	// load: it must not be credited with the others' average.
	Ready int
	// Values holds the metric of each replica whose head reported one.
	// Replicas without metrics are left out, never counted as 0.
	Values []float64
	// Demand is true when requests are waiting for a deployment with no
	// ready replica (the router's activator): the scale-from-zero signal.
	Demand bool
}

// Decision is the autoscaler's answer.
type Decision struct {
	Desired int
	// Mode is "stable" or "panic" (KPA), "band" (APA).
	Mode string
	// Value is the metric's per-replica average over the window used.
	Value  float64
	Reason string
}

type sample struct {
	at    time.Time
	total float64 // the deployment's total (Σ over replicas)
	n     int     // replicas it was measured over
}

// Scaler holds one deployment's windows.
type Scaler struct {
	cfg     spec.Autoscaling
	min     int
	max     int
	samples []sample
	recs    []rec // recommendations, for the scale-down delay
	panicTo time.Time
}

type rec struct {
	at      time.Time
	desired int
}

// New returns a scaler for a validated spec (defaults applied).
func New(cfg spec.Autoscaling, min, max int) *Scaler {
	return &Scaler{cfg: cfg, min: min, max: max}
}

func (s *Scaler) window(now time.Time, d time.Duration) (total float64, n int, ok bool) {
	var sum, count float64
	for _, x := range s.samples {
		if now.Sub(x.at) <= d {
			sum += x.total
			count++
			n = max(n, x.n)
		}
	}
	if count == 0 {
		return 0, 0, false
	}
	return sum / count, n, true
}

// Step records an observation taken at now and returns the decision.
func (s *Scaler) Step(now time.Time, o Observation) Decision {
	stableW := time.Duration(s.cfg.StableWindowSeconds) * time.Second
	panicW := time.Duration(s.cfg.PanicWindowSeconds) * time.Second
	delay := time.Duration(s.cfg.ScaleDownDelaySeconds) * time.Second
	if len(o.Values) > 0 {
		var sum float64
		for _, v := range o.Values {
			sum += v
		}
		// The total is what the heads report. A ready head without metrics
		// adds nothing here, and it blocks scale-down below (not counted as 0).
		s.samples = append(s.samples, sample{now, sum, len(o.Values)})
	}
	keep := s.samples[:0]
	for _, x := range s.samples {
		if now.Sub(x.at) <= stableW {
			keep = append(keep, x)
		}
	}
	s.samples = keep
	clamp := func(d int) int { return min(max(d, s.min), s.max) }
	if o.Current == 0 {
		if o.Demand {
			return Decision{Desired: clamp(1), Mode: "activate", Reason: "requests are waiting and no replica is ready: scale from zero"}
		}
		return Decision{Desired: clamp(0), Mode: "stable", Reason: "no replica and no demand"}
	}
	stableTotal, n, ok := s.window(now, stableW)
	if !ok {
		return Decision{Desired: clamp(o.Current), Mode: "stable", Reason: "no metrics from any head yet: keeping the current count"}
	}
	var d Decision
	switch s.cfg.Policy {
	case "apa":
		avg := stableTotal / float64(max(o.Current, n))
		d = Decision{Desired: o.Current, Mode: "band", Value: avg}
		ratio := avg / s.cfg.Target
		switch {
		case ratio > 1+s.cfg.Tolerance, ratio < 1-s.cfg.Tolerance:
			d.Desired = int(math.Ceil(float64(o.Current) * ratio))
			d.Reason = fmt.Sprintf("%s %.3g per replica is outside %.3g ± %.0f %%", s.cfg.Metric, avg, s.cfg.Target, 100*s.cfg.Tolerance)
		default:
			d.Reason = fmt.Sprintf("%s %.3g per replica is within %.3g ± %.0f %%", s.cfg.Metric, avg, s.cfg.Target, 100*s.cfg.Tolerance)
		}
	default: // kpa
		stableWant := int(math.Ceil(stableTotal / s.cfg.Target))
		// A burst must panic within one tick: the newest sample counts as
		// much as the short window's average (Knative reads the window at 1 s).
		panicTotal, _, _ := s.window(now, panicW)
		if last := s.samples[len(s.samples)-1]; now.Sub(last.at) <= panicW {
			panicTotal = math.Max(panicTotal, last.total)
		}
		panicWant := int(math.Ceil(panicTotal / s.cfg.Target))
		if float64(panicWant) >= s.cfg.PanicThreshold*float64(o.Current) {
			s.panicTo = now.Add(stableW) // stay in panic for a stable window
		}
		avg := stableTotal / float64(max(o.Current, 1))
		if now.Before(s.panicTo) {
			// Panic: follow the short window up, never scale down.
			d = Decision{Desired: max(panicWant, stableWant, o.Current), Mode: "panic", Value: panicTotal / float64(max(o.Current, 1)),
				Reason: fmt.Sprintf("panic: %s total %.3g over %v wants %d replicas (≥ %.0f %% of %d)", s.cfg.Metric, panicTotal, panicW, panicWant, 100*s.cfg.PanicThreshold, o.Current)}
		} else {
			d = Decision{Desired: stableWant, Mode: "stable", Value: avg,
				Reason: fmt.Sprintf("%s total %.3g over %v at %.3g per replica wants %d", s.cfg.Metric, stableTotal, stableW, s.cfg.Target, stableWant)}
		}
	}
	// Rates: at most ×MaxScaleUpRate up and ÷MaxScaleDownRate down per decision.
	up := int(math.Ceil(float64(o.Current) * s.cfg.MaxScaleUpRate))
	down := int(math.Floor(float64(o.Current) / s.cfg.MaxScaleDownRate))
	if d.Desired > up {
		d.Desired, d.Reason = up, d.Reason+fmt.Sprintf("; limited to ×%g per step", s.cfg.MaxScaleUpRate)
	}
	if d.Desired < down {
		d.Desired = down
	}
	d.Desired = clamp(d.Desired)
	if len(o.Values) < o.Ready && d.Desired < o.Current {
		d.Desired = o.Current
		d.Reason += fmt.Sprintf("; no scale-down while %d ready head(s) report no metrics", o.Ready-len(o.Values))
	}
	// Scale-down delay: go down only to the highest recommendation of the delay window.
	s.recs = append(s.recs, rec{now, d.Desired})
	keepR := s.recs[:0]
	highest := 0
	for _, r := range s.recs {
		if now.Sub(r.at) <= delay {
			keepR = append(keepR, r)
			highest = max(highest, r.desired)
		}
	}
	s.recs = keepR
	if d.Desired < o.Current && highest > d.Desired {
		d.Reason += fmt.Sprintf("; scale-down held at %d by the %v delay", min(highest, o.Current), delay)
		d.Desired = min(highest, o.Current)
	}
	return d
}
