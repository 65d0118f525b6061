package coordinator

import (
	"testing"

	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

// A deployment with roles runs as its two roles' deployments; the others
// pass as they are.
func TestExpandRoles(t *testing.T) {
	parse := func(doc string) *spec.Deployment {
		d, err := spec.Parse([]byte(doc))
		require.NoError(t, err)
		return d
	}
	rr := parse(`apiVersion: shoal/v1
name: rr
model: {source: /m}
engine: {kind: vllm, kvTransfer: {connector: nixl}}
resources: {nodes: 1, gpusPerNode: 8}
roles:
  prefill: {replicas: {min: 1, max: 3}, autoscaling: {policy: kpa, metric: num_requests_waiting, target: 5}}
  decode: {replicas: {count: 2}}
  ratio: {min: 1}
`)
	plain := parse("apiVersion: shoal/v1\nname: plain\nmodel: {source: /m}\nresources: {nodes: 1, gpusPerNode: 8}\n")
	out, roles := expandRoles([]*store.DeploymentRecord{{Name: "rr", Spec: rr, SpecYAML: "y"}, {Name: "plain", Spec: plain}})
	var names []string
	for _, r := range out {
		names = append(names, r.Name)
	}
	require.Equal(t, []string{"rr-prefill", "rr-decode", "plain"}, names)
	require.Equal(t, "y", out[0].SpecYAML, "a role shows the spec it came from")
	require.Equal(t, roleInfo{parent: "rr", role: spec.RolePrefill, ratio: rr.Roles.Ratio, decode: out[1].Spec}, roles["rr-prefill"])
	require.Equal(t, spec.RoleDecode, roles["rr-decode"].role)
	require.NotContains(t, roles, "plain")

	c := New(Config{})
	c.roles = roles
	require.Equal(t, 2, c.desiredReplicas(out[0].Spec), "min 1 of the prefill autoscaler, bounded to one per decode replica")
	require.Equal(t, 2, c.desiredReplicas(out[1].Spec))
	require.Contains(t, c.events.list("rr")[0], "roles.ratio ≥ 1: prefill replicas 2 (the autoscaler's 1) for 2 decode replica(s)")
}
