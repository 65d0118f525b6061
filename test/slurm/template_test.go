package slurm

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestAgentsInAnAllocation submits deploy/slurm/shoal-agents.sbatch as a
// user would: its agents join the cluster with the job's id, end time and
// GPUs, and an ordinary (not Slurm-sourced) deployment serves on them.
func TestAgentsInAnAllocation(t *testing.T) {
	c := startSlurm(t, 2)
	e := startShoal(t, c)
	bin := filepath.Join(e.Dir, "bin")
	tmpl, err := filepath.Abs("../../deploy/slurm/shoal-agents.sbatch")
	require.NoError(t, err)
	out, err := c.Cmd("sbatch", "--parsable", "--nodes=2", "--gres=gpu:4", "--time=10", "--signal=USR1@120", "--output="+e.Dir+"/agents-%j.out",
		"--export=ALL,TMPDIR="+filepath.Join(e.Dir, "tmp")+",SHOAL_BIN="+filepath.Join(binDir, "shoal")+",SHOAL_JOIN="+e.Gossip+
			",SHOAL_INSECURE=1,SHOAL_GPU_BACKEND=mock:h200x8,SHOAL_GOSSIP_PROFILE=local,SHOAL_SKIP_LOCAL_MODEL_CHECK=1"+
			",SHOAL_RAY_BIN="+filepath.Join(bin, "ray")+",SHOAL_VLLM_BIN="+filepath.Join(bin, "vllm")+",SHOAL_SIM_LOAD_SECONDS=1",
		tmpl)
	require.NoError(t, err, out)
	job := strings.TrimSpace(out)
	var nodes string
	require.Eventually(t, func() bool { nodes, _ = e.Run("get", "nodes"); return strings.Count(nodes, "-j"+job) == 2 }, 60*time.Second, 250*time.Millisecond,
		"both agents of job %s join", job)
	spec := fmt.Sprintf(`apiVersion: shoal/v1
kind: Deployment
name: m
model: {source: /models/m}
engine: {kind: ray-vllm, tensorParallelSize: 4, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 4, gpuModel: H200}
replicas: {count: 1}
`)
	out, err = e.Apply("m", spec)
	require.NoError(t, err, out)
	e.WaitReady(1, 90*time.Second)
	require.NoError(t, e.Complete("m"))
	d, err := e.Run("describe", "node", "n1-j"+job)
	require.NoError(t, err, d)
	require.Regexp(t, `Slurm:     job `+job+` on n\[1-2\], ends 20\d\d-[0-9T:-]+Z, port band \d+ \(ports \+\d+00\)`, d,
		"the agent reports its job, node list, end and port band")
}
