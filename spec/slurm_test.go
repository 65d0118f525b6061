package spec

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const slurmBase = `apiVersion: shoal/v1
kind: Deployment
name: m
model: {source: /models/m}
engine: {kind: vllm, tensorParallelSize: 8}
resources: {nodes: 1, gpusPerNode: 8}
`

func TestSlurmSpec(t *testing.T) {
	d, err := Parse([]byte(slurmBase + "slurm: {partition: gpu, timeLimitMinutes: 240}\n"))
	require.NoError(t, err)
	require.Equal(t, &Slurm{Partition: "gpu", GRES: "gpu:8", TimeLimitMinutes: 240, HandoverLeadSeconds: DefaultHandoverLeadSeconds,
		QueueWaitWarningSeconds: DefaultQueueWaitWarningSeconds}, d.Slurm, "GRES defaults to the node's GPUs")
	for _, tc := range []struct{ slurm, want string }{
		{"{}", "slurm.timeLimitMinutes: is required"},
		{"{timeLimitMinutes: 20}", "slurm.handoverLeadSeconds: 900 s is more than half the job's time limit (20 min)"},
		{"{timeLimitMinutes: 240, options: [--nodes=3]}", "slurm.options[0]: --nodes is set by shoal"},
		{"{timeLimitMinutes: 240, options: [exclusive]}", `slurm.options[0]: "exclusive" is not an sbatch option`},
		{"{timeLimitMinutes: 240, partition: \"a b\"}", "slurm.partition"},
		{"{timeLimitMinutes: 240, handoverLeadSeconds: -1}", "must not be negative"},
		{"{timeLimitMinutes: 240, walltime: 3}", "walltime"},
	} {
		_, err := Parse([]byte(slurmBase + "slurm: " + tc.slurm + "\n"))
		require.ErrorContains(t, err, tc.want, tc.slurm)
	}
}

func TestShiftPorts(t *testing.T) {
	d, err := Parse([]byte(strings.Replace(slurmBase, "engine: {kind: vllm, tensorParallelSize: 8}",
		"engine: {kind: vllm, tensorParallelSize: 8, kvTransfer: {connector: nixl, role: prefill}}", 1)))
	require.NoError(t, err)
	s := ShiftPorts(d, 300)
	require.Equal(t, d.Engine.Port+300, s.Engine.Port)
	require.Equal(t, d.Engine.RayPort+300, s.Engine.RayPort)
	require.Equal(t, d.Engine.MasterPort+300, s.Engine.MasterPort)
	require.Equal(t, KVEventsPortOf(&d.Engine)+300, s.Engine.KVEventsPort)
	require.Equal(t, d.Engine.KVTransfer.SideChannelPort+300, s.Engine.KVTransfer.SideChannelPort)
	require.Equal(t, 8000, d.Engine.Port, "the stored spec is not changed")
	require.Same(t, d, ShiftPorts(d, 0))
	require.NoError(t, s.Validate(), "ports keep their distances")
}
