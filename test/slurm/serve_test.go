package slurm

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"
)

// shoalEnv is a coordinator with --slurm on the test's own address, whose
// jobs' nodes start agents (on the simulator) that join it.
type shoalEnv struct {
	t      *testing.T
	c      *cluster
	dir    string
	api    string
	router string
	gossip string
	coord  *exec.Cmd
}

func startShoal(t *testing.T, c *cluster) *shoalEnv {
	dir := filepath.Join(c.dir, "shoal")
	bin := filepath.Join(dir, "bin")
	require.NoError(t, os.MkdirAll(bin, 0o755))
	for _, n := range []string{"ray", "vllm", "python3"} {
		require.NoError(t, os.Symlink(filepath.Join(binDir, "shoal-sim"), filepath.Join(bin, n)))
	}
	root := c.net.Root()
	e := &shoalEnv{t: t, c: c, dir: dir, api: fmt.Sprintf("%s:%d", root, freePort(t)), router: fmt.Sprintf("%s:%d", root, freePort(t))}
	gp := freePort(t)
	e.gossip = fmt.Sprintf("%s:%d", root, gp)
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "tmp"), 0o755))
	// TMPDIR: the agents' state directories are the test's (job ids start
	// at 1 in every test cluster).
	agent := strings.Join([]string{"env", "TMPDIR=" + filepath.Join(dir, "tmp"), filepath.Join(binDir, "shoal"), "agent", "--slurm", "--join", fmt.Sprintf("%s:%d", root, gp), "--insecure",
		"--gpu-backend", "mock:h200x8", "--ray-bin", filepath.Join(bin, "ray"), "--vllm-bin", filepath.Join(bin, "vllm"),
		"--python-bin", filepath.Join(bin, "python3"), "--gossip-profile", "local", "--stop-grace", "2s", "--restart-backoff", "500ms",
		"--canary-interval", "3s", "--skip-local-model-check", "--engine-env", "SHOAL_SIM_STATE_DIR=" + filepath.Join(dir, "sim"),
		"--engine-env", "SHOAL_SIM_LOAD_SECONDS=1"}, " ")
	e.coord = c.spawn("coordinator", []string{filepath.Join(binDir, "shoal"), "coordinator", "--address", root, "--gossip-port", strconv.Itoa(gp),
		"--api", e.api, "--router", e.router, "--data-dir", filepath.Join(dir, "coordinator"), "--gossip-profile", "local", "--metrics-addr=",
		"--log-level=debug", "--no-api-keys", "--insecure", "--slurm", "--slurm-interval", "1s", "--slurm-agent-command", agent}, "")
	require.Eventually(t, func() bool { _, err := e.shoal("get", "nodes"); return err == nil }, 20*time.Second, 100*time.Millisecond)
	return e
}

func (e *shoalEnv) shoal(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
	cmd.Env = append(os.Environ(), "SHOAL_INSECURE=1", "SHOAL_COORDINATOR="+e.api)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// spec is a Slurm-sourced deployment of one node × 4 GPUs per replica.
func (e *shoalEnv) spec(name string, replicas int, slurm string) string {
	return fmt.Sprintf(`apiVersion: shoal/v1
kind: Deployment
name: %s
model: {source: /models/%s}
engine: {kind: ray-vllm, tensorParallelSize: 4, startupTimeoutSeconds: 60}
resources: {nodes: 1, gpusPerNode: 4, gpuModel: H200}
replicas: {count: %d}
slurm: {partition: gpu, timeLimitMinutes: 10, handoverLeadSeconds: 60, options: ["--output=%s/job-%%j.out"]%s}
`, name, name, replicas, e.dir, slurm)
}

func (e *shoalEnv) apply(name, spec string) (string, error) {
	f := filepath.Join(e.dir, name+".yaml")
	require.NoError(e.t, os.WriteFile(f, []byte(spec), 0o644))
	return e.shoal("apply", "-f", f)
}

type replica struct {
	GroupID          string   `json:"groupId"`
	Deployment       string   `json:"deployment"`
	State            string   `json:"state"`
	Members          []string `json:"members"`
	SlurmJob         string   `json:"slurmJob"`
	SlurmReason      string   `json:"slurmReason"`
	SlurmWaitSeconds string   `json:"slurmWaitSeconds"`
}

func (e *shoalEnv) replicas() []replica {
	out, err := e.shoal("get", "replicas", "-o", "json")
	if err != nil {
		return nil
	}
	var r struct {
		Replicas []replica `json:"replicas"`
	}
	if json.Unmarshal([]byte(out), &r) != nil {
		return nil
	}
	return r.Replicas
}

func ready(rs []replica) (n int, jobs []string) {
	for _, r := range rs {
		if r.State == "ready" && r.GroupID != "" {
			n++
			jobs = append(jobs, r.SlurmJob)
		}
	}
	return n, jobs
}

// jobs are the cluster's live jobs named shoal.….
func (c *cluster) jobs() []string {
	out, err := c.cmd("squeue", "--noheader", "--format=%i %j %T")
	if err != nil {
		return nil
	}
	var ids []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && strings.HasPrefix(f[1], "shoal.") && f[2] != "COMPLETING" {
			ids = append(ids, f[0])
		}
	}
	return ids
}

func (e *shoalEnv) waitReady(n int, within time.Duration) []string {
	e.t.Helper()
	var jobs []string
	require.Eventually(e.t, func() bool {
		var got int
		got, jobs = ready(e.replicas())
		return got == n
	}, within, 250*time.Millisecond, "want %d ready replica(s): %v\n%s", n, e.replicas(), e.describe("m"))
	return jobs
}

func (e *shoalEnv) describe(name string) string {
	out, _ := e.shoal("describe", "deployment", name)
	return out
}

func (e *shoalEnv) client() openai.Client {
	return openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1"), option.WithAPIKey("x"), option.WithMaxRetries(0))
}

func (e *shoalEnv) complete(model string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cl := e.client()
	r, err := cl.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(model),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("hello")}, MaxTokens: openai.Int(4)})
	if err == nil && len(r.Choices) == 0 {
		err = fmt.Errorf("no choices")
	}
	return err
}

// load sends completions from workers until stop; it counts failures.
type load struct {
	ok, failed atomic.Int64
	errs       sync.Map
	stop       chan struct{}
	wg         sync.WaitGroup
}

func (e *shoalEnv) startLoad(model string, workers int) *load {
	l := &load{stop: make(chan struct{})}
	for i := 0; i < workers; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				if err := e.complete(model); err != nil {
					l.failed.Add(1)
					l.errs.Store(err.Error(), true)
				} else {
					l.ok.Add(1)
				}
			}
		}()
	}
	return l
}

func (l *load) end() (ok, failed int64, errs []string) {
	close(l.stop)
	l.wg.Wait()
	l.errs.Range(func(k, _ any) bool { errs = append(errs, k.(string)); return len(errs) < 5 })
	return l.ok.Load(), l.failed.Load(), errs
}

// TestSlurmSourcedDeployment: a deployment whose nodes come from Slurm
// scales 0 → 1 → 2 through sbatch, serves completions on the jobs' nodes,
// and scales in with its jobs cancelled.
func TestSlurmSourcedDeployment(t *testing.T) {
	c := startSlurm(t, 3)
	e := startShoal(t, c)

	t0 := time.Now()
	out, err := e.apply("m", e.spec("m", 1, ""))
	require.NoError(t, err, out)
	jobs := e.waitReady(1, 90*time.Second)
	t.Logf("apply → serving on Slurm job %v: %v", jobs, time.Since(t0).Round(10*time.Millisecond))
	require.Len(t, c.jobs(), 1, "one job per replica")
	require.NoError(t, e.complete("m"))
	rs := e.replicas()
	require.Len(t, rs, 1)
	require.Contains(t, rs[0].Members[0], "-j"+jobs[0], "the replica runs on its job's node: %v", rs)

	out, err = e.apply("m", e.spec("m", 2, ""))
	require.NoError(t, err, out)
	jobs = e.waitReady(2, 90*time.Second)
	require.NotEqual(t, jobs[0], jobs[1], "each replica is a job of its own")
	require.Len(t, c.jobs(), 2)
	for i := 0; i < 4; i++ {
		require.NoError(t, e.complete("m"))
	}

	out, err = e.apply("m", e.spec("m", 1, ""))
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return len(c.jobs()) == 1 }, 60*time.Second, 250*time.Millisecond,
		"scale-in cancels the released replica's job: %v\n%s", c.jobs(), e.describe("m"))
	e.waitReady(1, 10*time.Second)
	require.Contains(t, e.describe("m"), "cancelled Slurm job")
	require.NoError(t, e.complete("m"))

	out, err = e.shoal("delete", "deployment", "m")
	require.NoError(t, err, out)
	require.Eventually(t, func() bool { return len(c.jobs()) == 0 }, 60*time.Second, 250*time.Millisecond, "deleting the deployment cancels its jobs")
	require.Eventually(t, func() bool { return len(e.replicas()) == 0 }, 30*time.Second, 250*time.Millisecond, "no stray replica")
}
