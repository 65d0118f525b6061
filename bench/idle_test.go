package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/internal/devcluster"
)

// TestIdleCost measures what idle daemons cost: a cluster of a coordinator
// and three agents with production (lan) gossip timings and the default
// canary interval, one replica of two nodes serving (a head and a worker)
// and a spare, and beside them a gossip-only process (memberlist alone,
// bench/gossipfloor) as the floor. It samples each process's CPU time from
// /proc over the measurement and its resident memory, and prints them
// against the targets (spare agent ≤ 0.5 % of a core, head's ≤ 1 %, RSS ≤
// 40 MB) and the floor. Opt-in:
//
//	SHOAL_IDLE_COST=60s go test -run TestIdleCost -v -timeout 10m ./bench/
//
// SHOAL_BENCH_BIN_DIR names a directory with prebuilt shoal and shoal-sim
// binaries (another commit's, to compare) instead of building these.
// SHOAL_IDLE_COLD=1 (root) drops the page cache before the daemons start:
// most of an agent's resident memory is pages of the shoal binary (file,
// not anon), and how many are mapped depends on whether the binary was in
// the page cache (just built or installed) or read from disk (a boot).
func TestIdleCost(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("SHOAL_IDLE_COST"))
	if err != nil || d <= 0 {
		t.Skip("set SHOAL_IDLE_COST=60s to measure the idle cost of agents")
	}
	dir := t.TempDir()
	bins := os.Getenv("SHOAL_BENCH_BIN_DIR")
	build := func(out, pkg string) {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
		b, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", b)
	}
	if bins == "" {
		bins = filepath.Join(dir, "bin")
		build(filepath.Join(bins, "shoal"), "../cmd/shoal")
		build(filepath.Join(bins, "shoal-sim"), "../cmd/shoal-sim")
	}
	floorBin := filepath.Join(dir, "gossipfloor")
	build(floorBin, "./gossipfloor")

	if os.Getenv("SHOAL_IDLE_COLD") == "1" {
		_ = exec.Command("sync").Run()
		require.NoError(t, os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200), "dropping the page cache needs root")
	}
	const ip = "127.0.40."
	c, err := devcluster.Start(devcluster.Config{Dir: filepath.Join(dir, "cluster"), ShoalBin: filepath.Join(bins, "shoal"),
		SimBin: filepath.Join(bins, "shoal-sim"), Agents: 3, IPPrefix: ip, FirstIP: 2, CoordIP: ip + "1", GossipPort: 7946,
		APIAddr: ip + "1:7950", RouterAddr: ip + "1:8080", Profile: "lan", SimEnv: []string{"SHOAL_SIM_LOAD_SECONDS=1"},
		AgentArgs: []string{"--canary-interval", "30s", "--hang-timeout", "60s"}})
	require.NoError(t, err)
	t.Cleanup(c.Stop)
	cli := func(args ...string) (string, error) {
		cmd := exec.Command(filepath.Join(bins, "shoal"), args...)
		cmd.Env = append(os.Environ(), c.ClientEnv()...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	specFile := filepath.Join(dir, "demo.yaml")
	require.NoError(t, os.WriteFile(specFile, []byte(`apiVersion: shoal/v1
name: demo
model: {source: /models/demo}
engine: {servedModelName: demo, startupTimeoutSeconds: 120}
resources: {nodes: 2, gpusPerNode: 8}
`), 0o644))
	require.Eventually(t, func() bool { _, err := cli("apply", "-f", specFile); return err == nil }, time.Minute, time.Second)
	var head, worker string
	require.Eventually(t, func() bool {
		out, err := cli("get", "replicas", "-o", "json")
		if err != nil {
			return false
		}
		var r struct {
			Replicas []struct {
				State, Head string
				Members     []string
			} `json:"replicas"`
		}
		if json.Unmarshal([]byte(out), &r) != nil || len(r.Replicas) != 1 || r.Replicas[0].State != "ready" {
			return false
		}
		head = r.Replicas[0].Head
		for _, m := range r.Replicas[0].Members {
			if m != head {
				worker = m
			}
		}
		return true
	}, 3*time.Minute, time.Second, "the replica never became ready")
	pids := map[string]int{}
	for i := 0; i < 3; i++ {
		id := devcluster.NodeID(i)
		switch id {
		case head:
			pids["agent (head)"] = c.AgentPid(i)
		case worker:
			pids["agent (worker)"] = c.AgentPid(i)
		default:
			pids["agent (spare)"] = c.AgentPid(i)
		}
	}
	floor := exec.Command(floorBin, "--address", ip+"9", "--port", "7946", "--join", ip+"1:7946", "--profile", "lan",
		"--key-file", filepath.Join(c.TLSDir("ca"), "gossip.key"))
	require.NoError(t, floor.Start())
	t.Cleanup(func() { _ = floor.Process.Kill(); _ = floor.Wait() })
	pids["memberlist only (floor)"] = floor.Process.Pid
	time.Sleep(10 * time.Second) // the floor joins; every member settles

	ticks0 := map[string]uint64{}
	for name, pid := range pids {
		ticks0[name] = cpuTicks(t, pid)
	}
	start := time.Now()
	time.Sleep(d)
	elapsed := time.Since(start).Seconds()
	hz := clockTicks(t)
	t.Logf("idle cost over %.0f s, lan gossip, 4 gossip members + the coordinator (CPU from /proc, %% of one core)", elapsed)
	t.Logf("%-26s %8s %8s %15s %s", "process", "CPU %", "RSS MB", "(anon + file)", "target")
	cpu := map[string]float64{}
	for _, name := range []string{"agent (spare)", "agent (worker)", "agent (head)", "memberlist only (floor)"} {
		pid := pids[name]
		cpu[name] = float64(cpuTicks(t, pid)-ticks0[name]) / hz / elapsed * 100
		target := ""
		switch name {
		case "agent (spare)":
			target = "≤ 0.5 %, ≤ 40 MB"
		case "agent (head)":
			target = "≤ 1 %, ≤ 40 MB"
		case "agent (worker)":
			target = "≤ 40 MB"
		}
		t.Logf("%-26s %8.2f %8.1f %15s %s", name, cpu[name], status(t, pid, "VmRSS"),
			fmt.Sprintf("(%.1f + %.1f)", status(t, pid, "RssAnon"), status(t, pid, "RssFile")), target)
	}
	fl := cpu["memberlist only (floor)"]
	if fl > 0 {
		t.Logf("ratios to the floor: spare %.1f×, worker %.1f×, head %.1f×", cpu["agent (spare)"]/fl, cpu["agent (worker)"]/fl, cpu["agent (head)"]/fl)
	}
}

// cpuTicks is a process's user + system time, in clock ticks (/proc/PID/stat).
func cpuTicks(t *testing.T, pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	require.NoError(t, err)
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	require.NoError(t, err1)
	require.NoError(t, err2)
	return utime + stime
}

func clockTicks(t *testing.T) float64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err != nil {
		return 100 // Linux's USER_HZ almost everywhere
	}
	hz, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
	require.NoError(t, err)
	return hz
}

// status reads a memory field of /proc/PID/status, in MB.
func status(t *testing.T, pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			require.NoError(t, err)
			return kb / 1024
		}
	}
	t.Fatalf("no %s for pid %d", field, pid)
	return 0
}
