package coordinator

import (
	"testing"

	"github.com/shoalhq/shoal/coordinator/autoscale"
	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

func TestAutoscalerStatusShortfall(t *testing.T) {
	c := New(Config{})
	d := &spec.Deployment{Name: "m", Autoscaling: &spec.Autoscaling{Policy: "kpa", Metric: "num_requests_running", Target: 8}}
	require.Contains(t, c.autoscalerStatus(d), "no decision yet")
	// A scaler stored but not yet stepped (the autoscale loop publishes its
	// state first): the deployment keeps its minimum, never 0.
	d.Replicas.Min = 1
	c.scalers["m"] = &scalerState{}
	require.Equal(t, 1, c.desiredReplicas(d), "an undecided scaler must not read as 0 replicas")
	require.Contains(t, c.autoscalerStatus(d), "no decision yet")
	c.scalers["m"] = &scalerState{last: autoscale.Decision{Desired: 3, Mode: "panic", Reason: "burst"}, current: 1, decided: true}
	require.Contains(t, c.autoscalerStatus(d), "ScalingActive=True")
	c.short["m"] = "cannot place a replica: needs 2 idle healthy node(s)"
	st := c.autoscalerStatus(d)
	require.Contains(t, st, "AbleToScale=False (cannot place a replica")
	require.Contains(t, st, "current 1, desired 3")
	require.Equal(t, 3, c.desiredReplicas(d))
	require.Equal(t, 2, c.desiredReplicas(&spec.Deployment{Replicas: spec.Replicas{Count: 2}}))
}
