package bench

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/slurmtest"
	"github.com/stretchr/testify/require"
)

// BenchmarkSlurm measures shoal on a real Slurm cluster (internal/slurmtest:
// slurmctld, three slurmd hosts on network namespaces, agents and engines
// on the simulator with a 1 s weight load):
//
//   - apply → serving on a Slurm-sourced deployment, split into queue wait
//     (submitted → RUNNING), agent join (→ in gossip), placement (→ a group
//     on the job) and engine ready (→ ready), median of 3;
//   - SHOAL_BENCH_HANDOVERS (default 10) walltime handovers of 1-minute jobs
//     (30 s lead) under 4 clients: failed requests and time without a ready
//     replica; engines load their weights in SHOAL_BENCH_LOAD_SECONDS
//     (default 10; a real DeepSeek-R1 start takes minutes);
//   - the peer, measured in the same run: what HPC users script today — a
//     chain of the same 1-minute jobs running `vllm serve` (the simulator)
//     directly, each next one queued with --dependency=afterany on the
//     last, clients following the running job's node — across as many job
//     ends.
//
// go test -run '^$' -bench Slurm -benchtime 1x ./bench/ (root, slurm-wlm, munge).
func BenchmarkSlurm(b *testing.B) {
	slurmtest.Need(b)
	n := 10
	if v, err := strconv.Atoi(os.Getenv("SHOAL_BENCH_HANDOVERS")); err == nil && v > 0 {
		n = v
	}
	bins := b.TempDir()
	for _, p := range []string{"shoal", "shoal-sim"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(bins, p), "../cmd/"+p)
		cmd.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
		out, err := cmd.CombinedOutput()
		require.NoError(b, err, "%s", out)
	}
	load := 10 // seconds an engine takes to load its weights (DeepSeek-R1: minutes)
	if v, err := strconv.Atoi(os.Getenv("SHOAL_BENCH_LOAD_SECONDS")); err == nil && v > 0 {
		load = v
	}
	c := slurmtest.StartOn(b, bins, "10.213.79.", 3)
	e := slurmtest.StartShoalWith(b, c, load)
	b.ResetTimer()

	// 1. apply → serving, split.
	var phases [4][]time.Duration
	for i := 0; i < 3; i++ {
		ph := startPhases(b, c, e, fmt.Sprintf("s%d", i))
		for k := range ph {
			phases[k] = append(phases[k], ph[k])
		}
	}
	// queue wait: from apply (the coordinator's next Slurm pass, sbatch,
	// Slurm's scheduling) to RUNNING; a phase shorter than the 20-100 ms
	// polling reads as 0.
	names := []string{"queue wait", "agent join", "placement", "engine ready"}
	var total time.Duration
	for k, v := range phases {
		m := median(v)
		total += m
		b.Logf("apply → serving, %-12s median %6.2f s (%v)", names[k]+":", m.Seconds(), v)
	}
	b.Logf("apply → serving, total:       median-sum %6.2f s", total.Seconds())

	// 2. n handovers under load.
	spec := strings.Replace(e.Spec("h", 1, ""), "timeLimitMinutes: 10, handoverLeadSeconds: 60", "timeLimitMinutes: 1, handoverLeadSeconds: 30", 1)
	out, err := e.Apply("h", spec)
	require.NoError(b, err, out)
	require.Eventually(b, func() bool { got, _ := slurmtest.Ready(e.Replicas()); return got == 1 }, 90*time.Second, 250*time.Millisecond)
	l := e.StartLoad("h", 4)
	var down time.Duration
	seen := map[string]bool{}
	start := time.Now()
	last := time.Now()
	for len(seen) < n+1 && time.Since(start) < time.Duration(n+2)*time.Minute {
		got, jobs := slurmtest.Ready(e.Replicas())
		now := time.Now()
		if got == 0 {
			down += now.Sub(last)
		}
		last = now
		for _, j := range jobs {
			seen[j] = true
		}
		time.Sleep(200 * time.Millisecond)
	}
	ok, failed, errs := l.End()
	took := time.Since(start)
	require.Len(b, seen, n+1, "%d handovers in %v", len(seen)-1, took)
	b.Logf("engines load in %d s (simulated)", load)
	b.Logf("shoal: %d walltime handovers in %v under 4 clients: %d requests, %d failed %v; no ready replica for %.1f s",
		n, took.Round(time.Second), ok+failed, failed, errs, down.Seconds())
	out, err = e.Run("delete", "deployment", "h")
	require.NoError(b, err, out)
	require.Eventually(b, func() bool { return len(c.Jobs()) == 0 }, 60*time.Second, 250*time.Millisecond)

	// 3. The peer: a chain of sbatch jobs serving vllm directly.
	pok, pfailed, pdown, ptook := scriptedChain(b, c, e, bins, n, load)
	b.Logf("scripted sbatch chain: %d job ends in %v under 4 clients: %d requests, %d failed; no server for %.1f s",
		n, ptook.Round(time.Second), pok+pfailed, pfailed, pdown.Seconds())
	b.Logf("unavailable time per job end: shoal %.2f s, scripted chain %.2f s (ratio %.3f); failed requests: shoal %d, scripted %d",
		down.Seconds()/float64(n), pdown.Seconds()/float64(n), down.Seconds()/max(pdown.Seconds(), 0.001), failed, pfailed)
}

// startPhases applies a one-replica deployment and times its way to ready.
func startPhases(b *testing.B, c *slurmtest.Cluster, e *slurmtest.Shoal, name string) [4]time.Duration {
	t0 := time.Now()
	out, err := e.Apply(name, e.Spec(name, 1, ""))
	require.NoError(b, err, out)
	var job string
	var at [4]time.Time
	require.Eventually(b, func() bool {
		now := time.Now()
		rs := e.Replicas()
		for _, r := range rs {
			if r.Deployment == name && r.SlurmJob != "" && job == "" {
				job = r.SlurmJob
			}
		}
		if job == "" {
			return false
		}
		if at[0].IsZero() {
			if st, _ := c.Cmd("squeue", "--noheader", "--jobs="+job, "--format=%T"); strings.TrimSpace(st) == "RUNNING" {
				at[0] = now
			}
		}
		if !at[0].IsZero() && at[1].IsZero() {
			if nodes, _ := e.Run("get", "nodes"); strings.Contains(nodes, "-j"+job) {
				at[1] = now
			}
		}
		for _, r := range rs {
			if r.GroupID != "" && r.SlurmJob == job {
				if at[2].IsZero() && !at[1].IsZero() {
					at[2] = now
				}
				if r.State == "ready" && !at[2].IsZero() {
					at[3] = now
				}
			}
		}
		return !at[3].IsZero()
	}, 120*time.Second, 20*time.Millisecond)
	out, err = e.Run("delete", "deployment", name)
	require.NoError(b, err, out)
	require.Eventually(b, func() bool { return len(c.Jobs()) == 0 }, 60*time.Second, 250*time.Millisecond)
	return [4]time.Duration{at[0].Sub(t0), at[1].Sub(at[0]), at[2].Sub(at[1]), at[3].Sub(at[2])}
}

// scriptedChain runs the peer for n job ends.
func scriptedChain(b *testing.B, c *slurmtest.Cluster, e *slurmtest.Shoal, bins string, n, load int) (ok, failed int64, down, took time.Duration) {
	dir := filepath.Join(e.Dir, "chain")
	require.NoError(b, os.MkdirAll(filepath.Join(dir, "sim"), 0o755))
	vllm := filepath.Join(dir, "vllm")
	require.NoError(b, os.Symlink(filepath.Join(bins, "shoal-sim"), vllm))
	script := filepath.Join(dir, "serve.sbatch")
	require.NoError(b, os.WriteFile(script, []byte("#!/bin/bash\nexec srun --ntasks-per-node=1 env SHOAL_SIM_LOAD_SECONDS="+strconv.Itoa(load)+" SHOAL_SIM_STATE_DIR="+
		filepath.Join(dir, "sim")+" "+vllm+" serve /models/p --served-model-name p --host 0.0.0.0 --port 8000 --tensor-parallel-size 4\n"), 0o755))
	submit := func(dep string) string {
		args := []string{"--parsable", "--job-name=chain", "--nodes=1", "--gres=gpu:4", "--time=1", "--output=" + dir + "/job-%j.out"}
		if dep != "" {
			args = append(args, "--dependency=afterany:"+dep)
		}
		out, err := c.Cmd("sbatch", append(args, script)...)
		require.NoError(b, err, out)
		return strings.TrimSpace(out)
	}
	var endpoint atomic.Value // "host:port" of the running job's engine, "" while none answers
	endpoint.Store("")
	hc := &http.Client{Timeout: 20 * time.Second}
	defer hc.CloseIdleConnections()
	request := func() error {
		ep := endpoint.Load().(string)
		if ep == "" {
			time.Sleep(100 * time.Millisecond) // a client retrying a dead service
			return errors.New("no server")
		}
		resp, err := hc.Post("http://"+ep+"/v1/completions", "application/json", strings.NewReader(`{"model":"p","prompt":"hello","max_tokens":4}`))
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			time.Sleep(100 * time.Millisecond)
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	var l *slurmtest.Load
	cur := submit("")
	next := submit(cur)
	ends := 0
	start := time.Now()
	last := time.Now()
	serving := false // the clock and the clients start once the first job serves, as shoal's do
	for ends < n && time.Since(start) < time.Duration(n+4)*time.Minute {
		out, _ := c.Cmd("squeue", "--noheader", "--name=chain", "--format=%i %T %N")
		ep := ""
		running := map[string]bool{}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 3 && f[1] == "RUNNING" {
				running[f[0]] = true
				if f[0] == cur || f[0] == next {
					ep = c.Net.IP(f[2]) + ":8000"
				}
			}
		}
		if running[next] && serving {
			ends++ // cur ended and its successor runs
			cur, next = next, submit(next)
		}
		if ep != "" {
			// up only once the engine answers
			if resp, err := hc.Get("http://" + ep + "/health"); err != nil || resp.StatusCode != 200 {
				ep = ""
			} else {
				resp.Body.Close()
			}
		}
		now := time.Now()
		if !serving && ep != "" {
			serving, start = true, now
			l = slurmtest.StartLoad(4, request)
		}
		if serving && ep == "" {
			down += now.Sub(last)
		}
		last = now
		endpoint.Store(ep)
		time.Sleep(200 * time.Millisecond)
	}
	took = time.Since(start)
	_, _ = c.Cmd("scancel", "--name=chain")
	require.NotNil(b, l, "the chain never served")
	ok, failed, _ = l.End()
	require.Equal(b, n, ends, "the chain saw %d job ends", ends)
	return ok, failed, down, took
}

func median(v []time.Duration) time.Duration {
	s := append([]time.Duration(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}
