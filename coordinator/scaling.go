package coordinator

import (
	"context"
	"fmt"
	"time"

	"github.com/shoalhq/shoal/coordinator/autoscale"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/spec"
)

type scalerState struct {
	specJSON string // the spec the scaler was built for; a new apply resets it
	s        *autoscale.Scaler
	last     autoscale.Decision
	decided  bool // last holds a decision; a fresh state is published before its first Step
	current  int
}

// autoscaleLoop feeds every autoscaled deployment's scaler about every 2 s.
func (c *Coordinator) autoscaleLoop(ctx context.Context) {
	t := time.NewTicker(c.cfg.AutoscaleInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !c.leading() {
			continue // the leader's autoscaler decides
		}
		if err := c.autoscaleOnce(c.now()); err != nil {
			c.log.Warn("autoscale", "err", err)
		}
	}
}

// metricValue reads the spec's metric from a head's report.
func metricValue(metric string, v router.ReplicaView) (float64, bool) {
	m := v.Metrics
	if m == nil || !m.MetricsValid {
		return 0, false
	}
	switch metric {
	case "kv_cache_usage_perc", "gpu_cache_usage_perc":
		return m.KvCacheUsage, true
	case "num_requests_waiting":
		return m.NumRequestsWaiting, true
	case "num_requests_running":
		return m.NumRequestsRunning, true
	case "generation_tokens_per_second":
		return m.GenerationTokensPerSecond, true
	}
	return 0, false
}

func (c *Coordinator) autoscaleOnce(now time.Time) error {
	deps, err := c.deployments()
	if err != nil {
		return err
	}
	groups, err := c.store.Groups()
	if err != nil {
		return err
	}
	views := c.heads.Views()
	for _, d := range deps {
		a := d.Spec.Autoscaling
		if a == nil {
			continue
		}
		sj := string(d.Spec.JSON())
		c.mu.Lock()
		st := c.scalers[d.Name]
		if st == nil || st.specJSON != sj {
			st = &scalerState{specJSON: sj, s: autoscale.New(*a, d.Spec.Replicas.Min, d.Spec.Replicas.Max)}
			c.scalers[d.Name] = st
		}
		demand := now.Sub(c.demand[d.Spec.Engine.ServedModelName]) < 30*time.Second
		c.mu.Unlock()
		o := autoscale.Observation{Demand: demand}
		for _, g := range groups {
			if g.Deployment != d.Name || g.Draining() {
				continue
			}
			o.Current++
			if v, ok := views[g.ID]; ok && v.Key.Epoch == g.Epoch {
				if v.Routable {
					o.Ready++
				}
				if x, ok := metricValue(a.Metric, v); ok {
					o.Values = append(o.Values, x)
				}
			}
		}
		dec := st.s.Step(now, o)
		c.mu.Lock()
		changed := dec.Desired != st.last.Desired || st.current != o.Current
		st.last, st.current, st.decided = dec, o.Current, true
		c.mu.Unlock()
		if ri, ok := c.roleOf(d.Name); ok && ri.role == spec.RolePrefill && ri.ratio != nil {
			// The prefill role's count, bounded against the decode role's.
			dec.Desired = spec.RoleDesired(dec.Desired, c.desiredReplicas(ri.decode), ri.ratio)
		}
		c.asDesired.WithLabelValues(d.Name).Set(float64(dec.Desired))
		c.asCurrent.WithLabelValues(d.Name).Set(float64(o.Current))
		c.asValue.WithLabelValues(d.Name).Set(dec.Value)
		c.asPanic.WithLabelValues(d.Name).Set(map[bool]float64{true: 1}[dec.Mode == "panic"])
		if dec.Desired != o.Current && changed {
			c.asRescales.WithLabelValues(d.Name).Inc()
			c.events.add(d.Name, "", "AlgorithmRun %s: currentReplicas: %d, desiredReplicas: %d, rescale: true (%s)",
				a.Policy, o.Current, dec.Desired, dec.Reason)
			c.poke()
		}
	}
	return nil
}

// desiredReplicas is the count the reconciler keeps: the autoscaler's answer
// for autoscaled deployments (min until it has decided), the spec's otherwise.
func (c *Coordinator) desiredReplicas(d *spec.Deployment) int {
	if d.Autoscaling == nil {
		return d.DesiredReplicas()
	}
	n := c.scaledReplicas(d)
	if ri, ok := c.roleOf(d.Name); ok && ri.role == spec.RolePrefill && ri.ratio != nil {
		dc := c.desiredReplicas(ri.decode)
		if b := spec.RoleDesired(n, dc, ri.ratio); b != n {
			// Once per change (the same text is not repeated).
			c.events.add(ri.parent, d.Name+"/ratio", "roles.ratio %s: prefill replicas %d (the autoscaler's %d) for %d decode replica(s)",
				ri.ratio, b, n, dc)
			n = b
		}
	}
	return n
}

// scaledReplicas is the autoscaler's own answer for d.
func (c *Coordinator) scaledReplicas(d *spec.Deployment) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	// A scaler's state is stored before its first decision: until it has
	// one, its zero Desired must not read as "scale to 0" (that drained a
	// deployment's only replica the moment its autoscaler was created).
	if st := c.scalers[d.Name]; st != nil && st.decided {
		return st.last.Desired
	}
	return d.Replicas.Min
}

// autoscalerStatus is the text `shoal describe` shows.
func (c *Coordinator) autoscalerStatus(d *spec.Deployment) string {
	a := d.Autoscaling
	if a == nil {
		return ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.scalers[d.Name]
	if st == nil || !st.decided {
		return fmt.Sprintf("%s on %s, target %g per replica: no decision yet", a.Policy, a.Metric, a.Target)
	}
	cond := "AbleToScale=True"
	if why, short := c.short[d.Name]; short && st.last.Desired > st.current {
		cond = "AbleToScale=False (" + why + ")"
	} else if st.last.Desired > st.current {
		cond += ", ScalingActive=True"
	}
	return fmt.Sprintf("%s on %s, target %g per replica: current %d, desired %d, value %.3g, mode %s (%s); %s",
		a.Policy, a.Metric, a.Target, st.current, st.last.Desired, st.last.Value, st.last.Mode, st.last.Reason, cond)
}

// Demand records that a request waited for a model with no ready replica:
// the router's activator calls it so that a deployment scaled to zero starts.
func (c *Coordinator) Demand(model string) {
	c.mu.Lock()
	c.demand[model] = c.now()
	c.mu.Unlock()
	c.poke()
}
