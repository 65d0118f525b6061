package coordinator

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
)

const slurmSpec = `apiVersion: shoal/v1
kind: Deployment
name: m
model: {source: /models/m}
engine: {kind: vllm, tensorParallelSize: 8}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {count: 1}
slurm: {partition: gpu, timeLimitMinutes: 60, handoverLeadSeconds: 600}
`

// The Slurm node source through the coordinator, on the fake Slurm: apply
// checks with Slurm, the leader submits one job per replica (a follower
// only reads the queue), a pending job is a PENDING row, its joined node
// gets the replica, and a refusal or an unreachable slurmctld is said.
func TestSlurmSource(t *testing.T) {
	tc := newCoord(t)
	f := slurm.NewFake()
	f.Now = func() time.Time { return tc.clock }
	tc.c.cfg.Slurm = &SlurmConfig{Client: f, AgentCommand: "shoal agent --slurm --join 10.0.0.1:7946", Interval: time.Second, Timeout: time.Second}
	ctx := context.Background()

	f.Refuse = "sbatch: error: invalid partition specified: gpu"
	_, err := tc.api.Apply(ctx, &coordv1.ApplyRequest{SpecYaml: []byte(slurmSpec)})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.ErrorContains(t, err, "invalid deployment spec: slurm: refused the job: sbatch: error: invalid partition specified: gpu")
	f.Refuse = ""
	tc.apply(t, slurmSpec)

	tc.c.slurmPass(ctx, false)
	jobs, err := f.Jobs(ctx, "shoal.")
	require.NoError(t, err)
	require.Empty(t, jobs, "a follower submits nothing")

	tc.c.slurmPass(ctx, true)
	jobs, err = f.Jobs(ctx, "shoal.")
	require.NoError(t, err)
	require.Len(t, jobs, 1)
	id := jobs[0].ID
	r := f.Request(id)
	require.Equal(t, "shoal.shoal.m", r.Name)
	require.Equal(t, []string{"--job-name=shoal.shoal.m", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:8", "--time=60", "--signal=USR1@600",
		"--partition=gpu", "--comment=shoal deployment m"}, r.Args())
	require.Contains(t, r.Script, "exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 shoal agent --slurm --join 10.0.0.1:7946")
	tc.c.slurmPass(ctx, true)
	jobs, _ = f.Jobs(ctx, "shoal.")
	require.Len(t, jobs, 1, "a pending job covers its replica: nothing more is submitted")

	f.Wait(id, "Resources")
	tc.c.slurmPass(ctx, true)
	rs, err := tc.api.ListReplicas(ctx, &coordv1.ListReplicasRequest{})
	require.NoError(t, err)
	require.Len(t, rs.Replicas, 1)
	require.Equal(t, "PENDING", rs.Replicas[0].State)
	require.Equal(t, "Resources", rs.Replicas[0].SlurmReason)
	require.Equal(t, id, rs.Replicas[0].SlurmJob)

	// The job starts; its agent joins; the replica goes on its node, and no
	// other deployment's would.
	f.Start(id, "n1")
	tc.mem.set(gossip.Tag{Kind: gossip.KindAgent, ID: "n1-j" + id, GRPC: "10.0.0.2:9047", GPUs: 8, Healthy: true, SlurmJob: id})
	tc.c.slurmPass(ctx, true)
	tc.reconcile(t)
	tc.settle()
	gs, err := tc.st.Store.Groups()
	require.NoError(t, err)
	require.Len(t, gs, 1)
	require.Equal(t, id, gs[0].SlurmJob)
	require.Equal(t, "n1-j"+id, gs[0].Members[0].NodeID)

	// slurmctld down: nothing is decided, and describe says why.
	f.Down = true
	tc.c.slurmPass(ctx, true)
	d, err := tc.api.DescribeDeployment(ctx, &coordv1.DescribeDeploymentRequest{Name: "m"})
	require.NoError(t, err)
	require.Contains(t, strings.Join(d.Events, "\n"), "cannot scale: slurm: cannot reach slurmctld")
	gs, _ = tc.st.Store.Groups()
	require.Len(t, gs, 1, "a job not listed while Slurm is down is not taken for ended")

	// Back up, the job gone: the replica ended with it and a new job is asked for.
	f.Down = false
	f.End(id, "TIMEOUT")
	tc.c.slurmPass(ctx, true)
	tc.reconcile(t)
	gs, _ = tc.st.Store.Groups()
	require.Empty(t, gs)
	jobs, _ = f.Jobs(ctx, "shoal.")
	require.Len(t, jobs, 1)
	require.NotEqual(t, id, jobs[0].ID)
}
