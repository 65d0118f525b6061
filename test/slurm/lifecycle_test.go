package slurm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/slurmtest"
	"github.com/stretchr/testify/require"
)

// TestSlurmWalltimeHandover: a replica's job reaches its handover lead
// (Slurm's --signal and the job's end time); shoal submits the replacement,
// brings it to ready, drains the old one and cancels its job — with zero
// failed requests under load. Then a job of a higher partition tier
// preempts the new one (Slurm's preempt/partition_prio, cancelled after its
// grace time): the head drains at once, and the replica is requested again
// and comes back once the preemptor is done.
func TestSlurmWalltimeHandover(t *testing.T) {
	c := startSlurm(t, 2)
	e := startShoal(t, c)
	spec := strings.Replace(e.Spec("m", 1, ""), "timeLimitMinutes: 10, handoverLeadSeconds: 60", "timeLimitMinutes: 2, handoverLeadSeconds: 60", 1)
	out, err := e.Apply("m", spec)
	require.NoError(t, err, out)
	first := e.WaitReady(1, 90*time.Second)[0]
	l := e.StartLoad("m", 4)
	// The handover begins 60 s before the 2-minute limit; the old job must
	// be gone well before Slurm would end it.
	var second string
	require.Eventually(t, func() bool {
		n, jobs := ready(e.Replicas())
		if n == 1 && jobs[0] != first {
			second = jobs[0]
		}
		return second != "" && !contains(c.Jobs(), first)
	}, 110*time.Second, 250*time.Millisecond, "the replica was not handed over to a new job before the old one's end")
	time.Sleep(2 * time.Second) // load on the new replica alone
	ok, failed, errs := l.End()
	t.Logf("handover %s → %s under load: %d requests, %d failed %v", first, second, ok+failed, failed, errs)
	require.Zero(t, failed, "no request fails across a walltime handover: %v", errs)
	require.Greater(t, ok, int64(20))
	d := e.Describe("m")
	require.Contains(t, d, "handing replica")
	require.Contains(t, d, "handed over")

	// Preempted: the head drains at once, the group is gone with its job,
	// and a new job brings the replica back.
	out, err = c.Cmd("sbatch", "--partition=urgent", "--nodes=2", "--gres=gpu:8", "--time=1", "--output=/dev/null", "--wrap", "srun sleep 8")
	require.NoError(t, err, out)
	var third string
	require.Eventually(t, func() bool {
		n, jobs := ready(e.Replicas())
		if n == 1 && jobs[0] != second {
			third = jobs[0]
		}
		return third != ""
	}, 90*time.Second, 250*time.Millisecond, "the replica was not requested again after its job was cancelled:\n%s", e.Describe("m"))
	require.NoError(t, e.Complete("m"))
	d = e.Describe("m")
	require.Contains(t, d, "its Slurm job "+second+" ended")
	log, err := os.ReadFile(filepath.Join(e.Dir, "job-"+second+".out"))
	require.NoError(t, err)
	require.Contains(t, string(log), "Slurm is ending the job (SIGTERM)", "the preempted agents drained on Slurm's SIGTERM")
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// TestSlurmQueueAndOutages: a job that cannot start stays PENDING with
// Slurm's reason (and an event past the warning bound) and leaves nothing
// behind when the deployment goes; slurmctld down: serving goes on and
// shoal says why it cannot scale; bad Slurm settings are refused at apply
// time in Slurm's words.
func TestSlurmQueueAndOutages(t *testing.T) {
	c := startSlurm(t, 2)
	e := startShoal(t, c)

	// Bad input, refused by Slurm itself (sbatch --test-only).
	for _, tc := range []struct{ from, to, want string }{
		{"partition: gpu", "partition: nope", "invalid partition"},
		{"timeLimitMinutes: 10", "timeLimitMinutes: 600", "time limit"},
		{"partition: gpu", "partition: gpu, gres: \"gpu:9\"", "Requested node configuration is not available"},
	} {
		out, err := e.Apply("bad", strings.Replace(e.Spec("bad", 1, ""), tc.from, tc.to, 1))
		require.Error(t, err, out)
		require.Contains(t, strings.ToLower(out), strings.ToLower(tc.want), out)
	}
	out, _ := e.Run("get", "deployments")
	require.NotContains(t, out, "bad", "a refused deployment is not stored")

	// Every GPU taken by someone else's job: ours waits in the queue.
	out, err := c.Cmd("sbatch", "--nodes=2", "--gres=gpu:8", "--time=5", "--output=/dev/null", "--wrap", "srun sleep 300")
	require.NoError(t, err, out)
	out, err = e.Apply("m", e.Spec("m", 1, ", queueWaitWarningSeconds: 2"))
	require.NoError(t, err, out)
	require.Eventually(t, func() bool {
		rs := e.Replicas()
		return len(rs) == 1 && rs[0].State == "PENDING" && rs[0].SlurmReason == "Resources" && rs[0].SlurmJob != ""
	}, 30*time.Second, 250*time.Millisecond, "the queued job shows as PENDING with Slurm's reason: %v", e.Replicas())
	require.Eventually(t, func() bool { return strings.Contains(e.Describe("m"), "has been pending for") }, 20*time.Second, 250*time.Millisecond)
	out, _ = e.Run("get", "replicas")
	require.Contains(t, out, "PENDING (Resources, waited")
	out, err = e.Run("delete", "deployment", "m")
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return len(c.Jobs()) == 0 && len(e.Replicas()) == 0 }, 30*time.Second, 250*time.Millisecond,
		"a deleted deployment's pending job is cancelled")
	out, err = c.Cmd("scancel", "--user=root")
	require.NoError(t, err, out)

	// slurmctld down: the replica serves on, scaling says why it cannot.
	out, err = e.Apply("m", e.Spec("m", 1, ""))
	require.NoError(t, err, out)
	e.WaitReady(1, 90*time.Second)
	c.StopCtld()
	out, err = e.Apply("m", e.Spec("m", 2, ""))
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return strings.Contains(e.Describe("m"), "cannot reach slurmctld") }, 60*time.Second, 500*time.Millisecond,
		"shoal says why it cannot scale:\n%s", e.Describe("m"))
	for i := 0; i < 5; i++ {
		require.NoError(t, e.Complete("m"), "serving goes on while slurmctld is down")
	}
	c.StartCtld()
	e.WaitReady(2, 120*time.Second)
}

// TestSlurmAccounts: with Slurm's accounting (slurmdbd on MariaDB,
// associations enforced), an account or QoS Slurm does not know is refused
// at apply time in Slurm's words, and a known account is what the jobs run
// under.
func TestSlurmAccounts(t *testing.T) {
	c := slurmtest.StartWithAccounts(t, binDir, slurmtest.Subnet, 1)
	e := startShoal(t, c)
	for _, tc := range []struct{ slurm, want string }{
		{", account: nope", "Invalid account or account/partition combination specified"},
		{", account: proj2", "Invalid account or account/partition combination specified"}, // exists, but not root's
		{", qos: nope", "Invalid qos specification"},
	} {
		out, err := e.Apply("bad", e.Spec("bad", 1, tc.slurm))
		require.Error(t, err, out)
		require.Contains(t, out, tc.want)
	}
	out, err := e.Apply("m", e.Spec("m", 1, ", account: proj1"))
	require.NoError(t, err, out)
	e.WaitReady(1, 90*time.Second)
	require.NoError(t, e.Complete("m"))
	acct, err := c.Cmd("squeue", "--noheader", "--format=%a %j")
	require.NoError(t, err, acct)
	require.Equal(t, "proj1 shoal.shoal.m", strings.TrimSpace(acct))
}
