package agent

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/spec"
)

// The members' node IPs come by run rank (the elected head first), from
// their gRPC addresses; one that cannot be read gives none (the plan then
// refuses with a clear error instead of guessing).
func TestMemberIPs(t *testing.T) {
	as := &Assignment{Members: []Member{{NodeID: "a", Rank: 0, GRPC: "10.0.0.1:7947"}, {NodeID: "b", Rank: 1, GRPC: "10.0.0.2:7947"},
		{NodeID: "c", Rank: 2, GRPC: "[fd00::3]:7947"}}}
	require.Equal(t, []string{"10.0.0.2", "10.0.0.1", "fd00::3"}, memberIPs(as, "b", "10.0.0.2"), "b was elected: it is rank 0")
	as.Members[2].GRPC = "garbage"
	require.Nil(t, memberIPs(as, "a", "10.0.0.1"))
}

// Every process of a plan, a rank's extra ones included, runs in a
// container under the containerd runtime.
func TestContainerizeExtraProcesses(t *testing.T) {
	p := &engine.Plan{Node: engine.Command{Name: "vllm"}, Extra: []engine.Command{{Name: "vllm", Log: "vllm-dp1"}, {Name: "vllm", Log: "vllm-dp2"}}}
	sp := &spec.Deployment{Engine: spec.Engine{Image: "vllm/vllm-openai:v0.11.0"}}
	require.NoError(t, containerize(p, sp, map[string]string{"io.shoal.group": "g"}))
	require.Equal(t, "vllm/vllm-openai:v0.11.0", p.Node.Container.Image)
	for _, c := range p.Extra {
		require.Equal(t, "vllm/vllm-openai:v0.11.0", c.Container.Image, c.Log)
		require.Equal(t, "g", c.Container.Labels["io.shoal.group"])
	}
}
