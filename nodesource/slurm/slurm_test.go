package slurm

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestRequestArgs(t *testing.T) {
	r := Request{Name: "shoal.c.m", Partition: "gpu", Account: "proj", QoS: "high", Nodes: 2, GRES: "gpu:8", Time: 90 * time.Second,
		Signal: 10 * time.Minute, Options: []string{"--exclusive"}, Comment: "shoal deployment m"}
	require.Equal(t, []string{"--job-name=shoal.c.m", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:8", "--time=2", "--signal=USR1@600",
		"--partition=gpu", "--account=proj", "--qos=high", "--comment=shoal deployment m", "--exclusive"}, r.Args())
	require.Equal(t, []string{"--job-name=x", "--nodes=1", "--ntasks-per-node=1"}, Request{Name: "x", Nodes: 1}.Args())
}

func TestParseSqueue(t *testing.T) {
	line := func(f ...string) string { return strings.Join(f, squeueSep) }
	out := line("12", "shoal.c.m", "PENDING", "Resources", "2026-12-02T02:18:04", "N/A", "N/A", "", "(null)") + "\n" +
		line("13", "shoal.c.m", "RUNNING", "None", "2026-12-02T02:18:04", "2026-12-02T02:18:05", "2026-12-02T02:28:05", "n[1-2]", "shoal deployment m") + "\n\n"
	jobs, err := ParseSqueue(out, time.UTC)
	require.NoError(t, err)
	require.Len(t, jobs, 2)
	require.Equal(t, Job{ID: "12", Name: "shoal.c.m", State: StatePending, Reason: "Resources", Submitted: time.Date(2026, 12, 2, 2, 18, 4, 0, time.UTC)}, jobs[0])
	require.True(t, jobs[0].Active())
	require.Equal(t, "n[1-2]", jobs[1].Nodes)
	require.Equal(t, time.Date(2026, 12, 2, 2, 28, 5, 0, time.UTC), jobs[1].Ends)
	require.Equal(t, "shoal deployment m", jobs[1].Comment)

	for _, bad := range []string{
		line("12", "n", "PENDING"),
		line("", "n", "R", "r", "N/A", "N/A", "N/A", "", ""),
		line("1 2", "n", "R", "r", "N/A", "N/A", "N/A", "", ""),
		line("12", "n", "R", "r", "yesterday", "N/A", "N/A", "", ""),
	} {
		_, err := ParseSqueue(bad, time.UTC)
		require.Error(t, err, "%q", bad)
	}
	require.False(t, Job{State: "CANCELLED"}.Active())
	require.False(t, Job{State: StateCompleting}.Active())
}

func TestParseJobID(t *testing.T) {
	for in, want := range map[string]string{"123\n": "123", "7;cluster\n": "7"} {
		got, err := ParseJobID(in)
		require.NoError(t, err)
		require.Equal(t, want, got)
	}
	for _, bad := range []string{"", "Submitted batch job 5", "-1", "x;y"} {
		_, err := ParseJobID(bad)
		require.Error(t, err, "%q", bad)
	}
}

func TestFromEnv(t *testing.T) {
	env := func(kv map[string]string) func(string) string { return func(k string) string { return kv[k] } }
	a, err := FromEnv(env(map[string]string{"SLURM_JOB_ID": "1234", "SLURMD_NODENAME": "gpu07", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
		"SLURM_JOB_NODELIST": "gpu[06-07]", "SLURM_STEP_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}))
	require.NoError(t, err)
	require.Equal(t, Alloc{JobID: "1234", Node: "gpu07", NodeIndex: 1, NNodes: 2, NodeList: "gpu[06-07]", GPUs: []string{"4", "5", "6", "7"}}, a,
		"the step's GPUs as the node numbers them, not CUDA's renumbering")
	require.Equal(t, "gpu07-j1234", a.NodeID())
	idx, uuids := a.Indices()
	require.Equal(t, []int{4, 5, 6, 7}, idx)
	require.Empty(t, uuids)

	a, err = FromEnv(env(map[string]string{"SLURM_JOBID": "9", "SLURMD_NODENAME": "n1", "CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}))
	require.NoError(t, err)
	_, uuids = a.Indices()
	require.Equal(t, []string{"GPU-aa", "GPU-bb"}, uuids)

	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{}, "SLURM_JOB_ID is not set"},
		{map[string]string{"SLURM_JOB_ID": "x1"}, "not a job id"},
		{map[string]string{"SLURM_JOB_ID": "1"}, "SLURMD_NODENAME is not set"},
		{map[string]string{"SLURM_JOB_ID": "1", "SLURMD_NODENAME": "n", "SLURM_NODEID": "-1"}, "not a count"},
		{map[string]string{"SLURM_JOB_ID": "1", "SLURMD_NODENAME": "n", "CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "NoDevFiles"},
	} {
		_, err := FromEnv(env(tc.env))
		require.ErrorContains(t, err, tc.want)
	}
}

func TestPortBand(t *testing.T) {
	require.Equal(t, 1, PortBand("20"))
	require.Equal(t, 6, PortBand("1245"))
	seen := map[int]bool{}
	for id := 1; id <= 200; id++ {
		b := PortBand(strconv.Itoa(id))
		require.True(t, b >= 1 && b <= PortBands)
		seen[b] = true
	}
	require.Len(t, seen, PortBands, "consecutive jobs use every band")
	// The highest band keeps the default ports below Linux's ephemeral
	// range (32768): the DP coordinator's window ends at 29565.
	require.Less(t, 29565+PortBands*PortBandWidth, 32768)
}

func TestFake(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	f := NewFake()
	f.Now = func() time.Time { return now }
	id, err := f.Submit(ctx, Request{Name: "shoal.c.m", Nodes: 1, Time: 10 * time.Minute})
	require.NoError(t, err)
	f.Start(id, "n1")
	j, err := f.Job(ctx, id)
	require.NoError(t, err)
	require.Equal(t, now.Add(10*time.Minute), j.Ends)
	require.NoError(t, f.Cancel(ctx, id))
	jobs, err := f.Jobs(ctx, "shoal.")
	require.NoError(t, err)
	require.Empty(t, jobs)
	f.Down = true
	_, err = f.Jobs(ctx, "shoal.")
	require.True(t, errors.Is(err, ErrUnreachable))
	f.Down, f.Refuse = false, "invalid partition specified: x"
	var ref *Refused
	require.ErrorAs(t, f.Test(ctx, Request{}), &ref)
}

// FuzzParseSqueue: squeue's output, whatever it holds, parses or is an
// error; a parsed job has an id without spaces.
func FuzzParseSqueue(f *testing.F) {
	f.Add(strings.Join([]string{"1", "n", "RUNNING", "None", "2026-12-02T02:18:04", "N/A", "Unknown", "n1", "c"}, squeueSep))
	f.Add("garbage\n\x1f\x1f")
	f.Fuzz(func(t *testing.T, s string) {
		jobs, err := ParseSqueue(s, time.UTC)
		if err != nil {
			return
		}
		for _, j := range jobs {
			if j.ID == "" || strings.ContainsAny(j.ID, " \t") {
				t.Fatalf("bad id %q", j.ID)
			}
		}
	})
}
