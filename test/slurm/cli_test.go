package slurm

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/stretchr/testify/require"
)

// TestCLIAgainstSlurm drives the real client (sbatch, squeue, scancel)
// against the real cluster: submit, list, read one job, test-only refusals
// in Slurm's words, cancel, and a cancelled job gone from the list.
func TestCLIAgainstSlurm(t *testing.T) {
	c := startSlurm(t, 1)
	cl := &slurm.CLI{Env: c.Env()}
	ctx := context.Background()
	req := slurm.Request{Name: "shoal.t.cli", Partition: "gpu", Nodes: 1, GRES: "gpu:2", Time: 90 * time.Second, Signal: 30 * time.Second,
		Comment: "shoal test", Script: "#!/bin/bash\nexec srun sleep 300\n"}
	require.NoError(t, cl.Test(ctx, req))
	id, err := cl.Submit(ctx, req)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		j, err := cl.Job(ctx, id)
		return err == nil && j.State == slurm.StateRunning
	}, 30*time.Second, 100*time.Millisecond)
	j, err := cl.Job(ctx, id)
	require.NoError(t, err)
	require.Equal(t, "n1", j.Nodes)
	require.Equal(t, "shoal test", j.Comment)
	require.WithinDuration(t, j.Started.Add(2*time.Minute), j.Ends, time.Second, "--time is whole minutes, rounded up")
	jobs, err := cl.Jobs(ctx, "shoal.t.")
	require.NoError(t, err)
	require.Len(t, jobs, 1)
	require.Equal(t, id, jobs[0].ID)
	none, err := cl.Jobs(ctx, "shoal.other.")
	require.NoError(t, err)
	require.Empty(t, none)

	for _, tc := range []struct {
		mod  func(*slurm.Request)
		want string
	}{
		{func(r *slurm.Request) { r.Partition = "nope" }, "invalid partition"},
		{func(r *slurm.Request) { r.Time = time.Hour }, "time limit"},
		{func(r *slurm.Request) { r.GRES = "gpu:9" }, "Requested node configuration is not available"},
	} {
		r := req
		tc.mod(&r)
		err := cl.Test(ctx, r)
		var ref *slurm.Refused
		require.ErrorAs(t, err, &ref)
		require.Contains(t, strings.ToLower(err.Error()), strings.ToLower(tc.want))
	}

	require.NoError(t, cl.Cancel(ctx, id))
	require.Eventually(t, func() bool {
		jobs, err := cl.Jobs(ctx, "shoal.t.")
		require.NoError(t, err)
		for _, j := range jobs {
			if j.Active() {
				t.Logf("still listed: %+v", j)
				return false
			}
		}
		return true
	}, 30*time.Second, 200*time.Millisecond)
	require.NoError(t, cl.Cancel(ctx, id), "cancelling an ended job is not an error")
}
