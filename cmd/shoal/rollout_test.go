package main

import (
	"testing"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/stretchr/testify/require"
)

func TestRolloutStatus(t *testing.T) {
	d := &coordv1.DescribeDeploymentResponse{Summary: &coordv1.DeploymentSummary{Name: "roll"}, Replicas: []*coordv1.ReplicaInfo{
		{State: "ready"}, {State: "ready", Outdated: true}, {State: "draining", Outdated: true}, {State: "starting"}}}
	require.Equal(t, "deployment roll: rolling out — 2 replica(s) with the current engine settings (1 ready), 1 outdated, 1 draining", rolloutStatus(d))
	d.Replicas = []*coordv1.ReplicaInfo{{State: "ready"}, {State: "ready"}}
	require.Equal(t, "deployment roll: every replica (2) runs the current engine settings and is ready", rolloutStatus(d))
}
