package slurm

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestSlurmSourcedDeployment: a deployment whose nodes come from Slurm
// scales 0 → 1 → 2 through sbatch, serves completions on the jobs' nodes,
// and scales in with its jobs cancelled.
func TestSlurmSourcedDeployment(t *testing.T) {
	c := startSlurm(t, 3)
	e := startShoal(t, c)

	t0 := time.Now()
	out, err := e.Apply("m", e.Spec("m", 1, ""))
	require.NoError(t, err, out)
	jobs := e.WaitReady(1, 90*time.Second)
	t.Logf("apply → serving on Slurm job %v: %v", jobs, time.Since(t0).Round(10*time.Millisecond))
	require.Len(t, c.Jobs(), 1, "one job per replica")
	require.NoError(t, e.Complete("m"))
	rs := e.Replicas()
	require.Len(t, rs, 1)
	require.Contains(t, rs[0].Members[0], "-j"+jobs[0], "the replica runs on its job's node: %v", rs)

	out, err = e.Apply("m", e.Spec("m", 2, ""))
	require.NoError(t, err, out)
	jobs = e.WaitReady(2, 90*time.Second)
	require.NotEqual(t, jobs[0], jobs[1], "each replica is a job of its own")
	require.Len(t, c.Jobs(), 2)
	for i := 0; i < 4; i++ {
		require.NoError(t, e.Complete("m"))
	}

	out, err = e.Apply("m", e.Spec("m", 1, ""))
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return len(c.Jobs()) == 1 }, 60*time.Second, 250*time.Millisecond,
		"scale-in cancels the released replica's job: %v\n%s", c.Jobs(), e.Describe("m"))
	e.WaitReady(1, 10*time.Second)
	require.Contains(t, e.Describe("m"), "cancelled Slurm job")
	require.NoError(t, e.Complete("m"))

	out, err = e.Run("delete", "deployment", "m")
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return len(c.Jobs()) == 0 }, 60*time.Second, 250*time.Millisecond, "deleting the deployment cancels its jobs")
	require.Eventually(t, func() bool { return len(e.Replicas()) == 0 }, 30*time.Second, 250*time.Millisecond, "no stray replica")
}
