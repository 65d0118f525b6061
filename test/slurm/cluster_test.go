// Package slurm runs shoal on a real Slurm cluster: Debian's slurmctld and
// one slurmd per network-namespace host (each with its own hostname in a
// UTS namespace, its own spool directory, proctrack/linuxproc, GPUs as GRES
// with device files), munge for authentication, and the coordinator
// submitting, watching and cancelling jobs through sbatch, squeue and
// scancel. With SHOAL_REQUIRE_SLURM=1 (CI) a missing Slurm fails the suite.
package slurm

import (
	"testing"

	"github.com/shoalhq/shoal/internal/slurmtest"
	"github.com/shoalhq/shoal/internal/testbin"
	"github.com/stretchr/testify/require"
)

var binDir string

func TestMain(m *testing.M) { testbin.Main(m, &binDir) }

// The cluster and shoal on it (internal/slurmtest, shared with bench/).
func startSlurm(t *testing.T, hosts int, partitions ...string) *slurmtest.Cluster {
	return slurmtest.Start(t, binDir, hosts, partitions...)
}

func startShoal(t *testing.T, c *slurmtest.Cluster) *slurmtest.Shoal {
	return slurmtest.StartShoal(t, c)
}

func ready(rs []slurmtest.Replica) (int, []string) { return slurmtest.Ready(rs) }

func TestSlurmClusterRunsAJob(t *testing.T) {
	c := startSlurm(t, 2)
	out, err := c.Cmd("srun", "--nodes=2", "--gres=gpu:4", "--ntasks-per-node=1", "--time=1", "sh", "-c", `echo "$(hostname) $SLURM_STEP_GPUS"`)
	require.NoError(t, err, out)
	require.Contains(t, out, "n1 0,1,2,3")
	require.Contains(t, out, "n2 0,1,2,3")
}
