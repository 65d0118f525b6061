package devcluster

import (
	"testing"

	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

// The demo deployments `shoal dev` applies are valid specs of the shape
// they claim.
func TestDemoSpecs(t *testing.T) {
	d, err := spec.Parse([]byte(DemoSpec))
	require.NoError(t, err)
	require.Equal(t, spec.EngineRayVLLM, d.Engine.Kind)
	require.Equal(t, 16, d.Engine.TensorParallelSize*d.Engine.PipelineParallelSize)

	d, err = spec.Parse([]byte(WideEPDemoSpec))
	require.NoError(t, err)
	require.Equal(t, spec.EngineVLLM, d.Engine.Kind)
	require.Equal(t, 16, d.Engine.DataParallel.Size)
	require.Equal(t, spec.LBHybrid, d.Engine.DataParallel.LoadBalancing)
	require.True(t, d.Engine.EPOn())
	require.Equal(t, d.Resources.Nodes*d.Resources.GPUsPerNode, d.Engine.DataParallel.Size*d.Engine.TensorParallelSize)

	d, err = spec.Parse([]byte(PDDemoSpec))
	require.NoError(t, err)
	require.Equal(t, 1, d.RoleDeployment(spec.RolePrefill).DesiredReplicas())
	require.Equal(t, 2, d.RoleDeployment(spec.RoleDecode).DesiredReplicas())
	require.Equal(t, "demo", d.RoleDeployment(spec.RoleDecode).Engine.ServedModelName)
}
