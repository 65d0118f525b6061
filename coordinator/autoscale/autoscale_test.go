package autoscale

import (
	"testing"
	"time"

	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

func kpa(t *testing.T, target float64, min, max int) *Scaler {
	d, err := spec.Parse([]byte(`apiVersion: shoal/v1
name: m
model: {source: /m}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {min: 1, max: 8}
autoscaling: {policy: kpa, metric: num_requests_waiting, target: 1}
`))
	require.NoError(t, err)
	a := *d.Autoscaling
	a.Target = target
	return New(a, min, max)
}

var t0 = time.Unix(1_000_000, 0)

func vals(n int, v float64) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = v
	}
	return out
}

// run feeds the same observation every 2 s for d and returns the last decision.
func run(s *Scaler, from time.Time, d time.Duration, o Observation) (Decision, time.Time) {
	var dec Decision
	at := from
	for ; at.Sub(from) <= d; at = at.Add(2 * time.Second) {
		dec = s.Step(at, o)
	}
	return dec, at
}

func TestSteadyLoadNoChange(t *testing.T) {
	s := kpa(t, 10, 1, 8)
	// 2 replicas each carrying exactly the target for 10 minutes.
	at := t0
	for i := 0; i < 300; i++ {
		d := s.Step(at, Observation{Current: 2, Ready: 2, Values: vals(2, 10)})
		require.Equal(t, 2, d.Desired, "tick %d: %s", i, d.Reason)
		at = at.Add(2 * time.Second)
	}
}

func TestBurstPanicsUpWithinOneTick(t *testing.T) {
	s := kpa(t, 10, 1, 8)
	_, at := run(s, t0, time.Minute, Observation{Current: 2, Ready: 2, Values: vals(2, 10)})
	// Load doubles and more: 2 replicas at 25 each = 50 → 5 replicas wanted.
	d := s.Step(at, Observation{Current: 2, Ready: 2, Values: vals(2, 25)})
	require.Equal(t, "panic", d.Mode, d.Reason)
	require.Equal(t, 4, d.Desired, "×2 per step: %s", d.Reason)
	d = s.Step(at.Add(2*time.Second), Observation{Current: 4, Ready: 4, Values: vals(4, 12.5)})
	require.Equal(t, 5, d.Desired, d.Reason)
	// In panic it never scales down, even when the load falls away.
	d = s.Step(at.Add(4*time.Second), Observation{Current: 5, Ready: 5, Values: vals(5, 0)})
	require.GreaterOrEqual(t, d.Desired, 5, d.Reason)
}

func TestDropScalesDownOnlyAfterDelay(t *testing.T) {
	s := kpa(t, 10, 1, 8)
	_, at := run(s, t0, 2*time.Minute, Observation{Current: 4, Ready: 4, Values: vals(4, 10)})
	// Load drops to a quarter: 1 replica is enough, but not for 300 s.
	d, at2 := run(s, at, 4*time.Minute, Observation{Current: 4, Ready: 4, Values: vals(4, 2.5)})
	require.Equal(t, 4, d.Desired, "held by the delay: %s", d.Reason)
	// The delay runs from the last higher recommendation (made while the 60 s
	// window still held the old load), so about 6 minutes after the drop:
	d, _ = run(s, at2, 150*time.Second, Observation{Current: 4, Ready: 4, Values: vals(4, 2.5)})
	require.Equal(t, 2, d.Desired, "÷2 per step after the delay: %s", d.Reason)
}

func TestMissingMetricsAreNotZero(t *testing.T) {
	s := kpa(t, 10, 1, 8)
	// 4 ready replicas, only 2 report, little load: no scale-down on partial data.
	d, _ := run(s, t0, 10*time.Minute, Observation{Current: 4, Ready: 4, Values: vals(2, 2)})
	require.Equal(t, 4, d.Desired, d.Reason)
	require.Contains(t, d.Reason, "report no metrics")
	// With every head reporting, the same load scales down (after the delay).
	d, _ = run(s, t0.Add(10*time.Minute), 10*time.Minute, Observation{Current: 4, Ready: 4, Values: vals(4, 1)})
	require.Less(t, d.Desired, 4, d.Reason)
	// A replica just ready, not yet scraped, is not credited with the other's
	// load: 12 running against 8 per replica wants 2, not 3.
	s = kpa(t, 8, 1, 8)
	d, _ = run(s, t0, time.Minute, Observation{Current: 2, Ready: 2, Values: []float64{12}})
	require.Equal(t, 2, d.Desired, d.Reason)
	s = kpa(t, 10, 1, 8)
	d = s.Step(t0, Observation{Current: 3})
	require.Equal(t, 3, d.Desired, "no metrics: keep")
	require.Contains(t, d.Reason, "no metrics")
}

// TestSeedConfigScales: the seed's KPA on kv_cache_usage_perc with target 0.5
// (a 0-1 fraction, as vLLM reports it) scales on a per-replica basis.
func TestSeedConfigScales(t *testing.T) {
	d, err := spec.Parse([]byte(`apiVersion: shoal/v1
name: deepseek-r1
model: {source: /m}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {min: 1, max: 4}
autoscaling: {policy: kpa, metric: kv_cache_usage_perc, target: 0.5}
`))
	require.NoError(t, err)
	s := New(*d.Autoscaling, d.Replicas.Min, d.Replicas.Max)
	dec, _ := run(s, t0, 70*time.Second, Observation{Current: 1, Ready: 1, Values: []float64{0.8}})
	require.Equal(t, 2, dec.Desired, dec.Reason)
	dec, _ = run(s, t0.Add(2*time.Minute), 70*time.Second, Observation{Current: 2, Ready: 2, Values: []float64{0.9, 0.95}})
	require.Equal(t, 4, dec.Desired, "bounded by max: %s", dec.Reason)
}

func TestBoundsAndScaleFromZero(t *testing.T) {
	s := kpa(t, 10, 0, 3)
	d := s.Step(t0, Observation{Current: 0})
	require.Equal(t, 0, d.Desired)
	d = s.Step(t0, Observation{Current: 0, Demand: true})
	require.Equal(t, 1, d.Desired)
	require.Equal(t, "activate", d.Mode)
	d, _ = run(s, t0, time.Minute, Observation{Current: 2, Ready: 2, Values: vals(2, 100)})
	require.Equal(t, 3, d.Desired, "max bound")
	s = kpa(t, 10, 2, 3)
	d = s.Step(t0, Observation{Current: 0})
	require.Equal(t, 2, d.Desired, "min bound")
}

func TestAPABand(t *testing.T) {
	s := kpa(t, 10, 1, 8)
	s.cfg.Policy = "apa"
	d, _ := run(s, t0, time.Minute, Observation{Current: 2, Ready: 2, Values: vals(2, 10.5)})
	require.Equal(t, 2, d.Desired, "within ±10 %%: %s", d.Reason)
	s = kpa(t, 10, 1, 8)
	s.cfg.Policy = "apa"
	d, _ = run(s, t0, time.Minute, Observation{Current: 2, Ready: 2, Values: vals(2, 15)})
	require.Equal(t, 3, d.Desired, d.Reason)
	require.Equal(t, "band", d.Mode)
}
