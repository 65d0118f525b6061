package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
)

// simAgent is a lightweight agent: the real gossip (its own memberlist on
// its own loopback address) and a real Agent API that takes Assign and
// Release as an agent does — persisting nothing, starting no engine, and
// advertising the assignment in its gossip tag.
type simAgent struct {
	mem      *gossip.Membership
	srv      *grpc.Server
	tag      gossip.Tag
	mu       sync.Mutex
	assigned *atomic.Int64
	agentv1.UnimplementedAgentServer
}

var assignCalls, otherCalls atomic.Int64

func (a *simAgent) Assign(_ context.Context, req *agentv1.AssignRequest) (*agentv1.AssignResponse, error) {
	assignCalls.Add(1)
	as := req.GetAssignment()
	a.mu.Lock()
	first := a.tag.Group == ""
	a.tag.Deployment, a.tag.Group, a.tag.Epoch, a.tag.Rank, a.tag.Size = as.Deployment, as.GroupId, as.Epoch, int(as.Rank), len(as.Members)
	a.tag.Engine = gossip.EngineReady
	t := a.tag
	a.mu.Unlock()
	if first {
		a.assigned.Add(1)
	}
	return &agentv1.AssignResponse{}, a.mem.SetTag(t) // it broadcasts in the background
}

func (a *simAgent) Release(_ context.Context, req *agentv1.ReleaseRequest) (*agentv1.ReleaseResponse, error) {
	a.mu.Lock()
	if a.tag.Group == req.GroupId {
		a.tag.Deployment, a.tag.Group, a.tag.Epoch, a.tag.Engine = "", "", 0, ""
		a.assigned.Add(-1)
	}
	t := a.tag
	a.mu.Unlock()
	return &agentv1.ReleaseResponse{}, a.mem.SetTag(t)
}

func (a *simAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	otherCalls.Add(1)
	a.mu.Lock()
	defer a.mu.Unlock()
	return &agentv1.StatusResponse{NodeId: a.tag.ID}, nil
}

// procStat reads a process's CPU seconds (user + system) and RSS bytes.
func procStat(pid int) (cpu float64, rss int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	pages, _ := strconv.ParseInt(f[21], 10, 64)
	return (ut + st) / 100, pages * int64(os.Getpagesize())
}

// reconcileP99 reads the p99 of shoal_coordinator_reconcile_seconds from a
// /metrics page (the upper bound of the bucket it falls in) and the mean.
func reconcileP99(url string) (p99, mean float64, passes int64) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, 0, 0
	}
	defer resp.Body.Close()
	type bucket struct {
		le float64
		n  int64
	}
	var bs []bucket
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, "shoal_coordinator_reconcile_seconds_bucket{le=\""):
			rest := strings.TrimPrefix(l, "shoal_coordinator_reconcile_seconds_bucket{le=\"")
			q := strings.IndexByte(rest, '"')
			le, _ := strconv.ParseFloat(rest[:q], 64)
			if rest[:q] == "+Inf" {
				le = math.Inf(1)
			}
			n, _ := strconv.ParseInt(strings.TrimSpace(rest[q+2:]), 10, 64)
			bs = append(bs, bucket{le, n})
		case strings.HasPrefix(l, "shoal_coordinator_reconcile_seconds_sum "):
			sum, _ = strconv.ParseFloat(strings.Fields(l)[1], 64)
		case strings.HasPrefix(l, "shoal_coordinator_reconcile_seconds_count "):
			passes, _ = strconv.ParseInt(strings.Fields(l)[1], 10, 64)
		}
	}
	for _, b := range bs {
		if float64(b.n) >= 0.99*float64(passes) {
			p99 = b.le
			break
		}
	}
	if passes > 0 {
		mean = sum / float64(passes)
	}
	return p99, mean, passes
}

type scaleResult struct {
	agents, replicas int
	placed           time.Duration
	p99, mean        float64
	passes           int64
	rss              int64
	cpu              float64 // coordinator CPU seconds from apply to all placed
	idleCPU          float64 // coordinator CPU share over 10 s once placed
}

// runScale starts a 3-server coordinator (processes, the real binary) and
// n simulated agents, applies a deployment of n·3/10 replicas of 2 nodes
// each (60 % of the agents), and measures until every member holds its
// assignment.
func runScale(t *testing.T, shoal string, n int) scaleResult {
	dir := t.TempDir()
	coordIP := func(i int) string { return fmt.Sprintf("127.6.0.%d", i+1) }
	var list, join []string
	for i := 0; i < 3; i++ {
		list = append(list, fmt.Sprintf("s%d=%s:7960", i+1, coordIP(i)))
		join = append(join, coordIP(i)+":7946")
	}
	var procs []*exec.Cmd
	for i := 0; i < 3; i++ {
		cmd := exec.Command(shoal, "--log-level", "warn", "coordinator", "--insecure", "--node-id", fmt.Sprintf("s%d", i+1), "--address", coordIP(i),
			"--gossip-port", "7946", "--join", strings.Join(join, ","), "--api", coordIP(i)+":7950", "--metrics-addr", coordIP(i)+":7951",
			"--router", "", "--data-dir", filepath.Join(dir, fmt.Sprintf("s%d", i+1)), "--raft-addr", coordIP(i)+":7960",
			"--servers", strings.Join(list, ","), "--gossip-profile", "lan")
		logf, _ := os.Create(filepath.Join(dir, fmt.Sprintf("s%d.log", i+1)))
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, cmd)
	}
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			_ = p.Wait()
		}
	}()
	// Which one leads: its /metrics says so.
	leader := -1
	deadline := time.Now().Add(30 * time.Second)
	for leader < 0 && time.Now().Before(deadline) {
		for i := 0; i < 3; i++ {
			resp, err := http.Get("http://" + coordIP(i) + ":7951/metrics")
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), "\nshoal_coordinator_raft_leader 1\n") {
				leader = i
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if leader < 0 {
		t.Fatal("no coordinator leader")
	}

	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	var assigned atomic.Int64
	agents := make([]*simAgent, n)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	base := runtime.NumGoroutine()
	defer func() {
		cancel()
		wg.Wait()
		for _, a := range agents {
			if a != nil {
				a.srv.Stop()
			}
		}
		// memberlist's probes end a probe interval after Shutdown: wait for
		// the goroutines to go back to what they were (goleak checks).
		for end := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > base && time.Now().Before(end); {
			time.Sleep(50 * time.Millisecond)
		}
	}()
	for i := 0; i < n; i++ {
		ip := fmt.Sprintf("127.7.%d.%d", i/250, i%250+1)
		l, err := net.Listen("tcp", ip+":7947")
		if err != nil {
			t.Fatal(err)
		}
		a := &simAgent{assigned: &assigned, tag: gossip.Tag{Kind: gossip.KindAgent, ID: fmt.Sprintf("node-%d", i), GRPC: ip + ":7947",
			GPUModel: "H200", GPUs: 8, GPUMemGiB: 141, Healthy: true, Metrics: ip + ":9400"}}
		a.mem = gossip.New(gossip.Config{Cluster: "shoal", BindAddr: ip, BindPort: 7946, Join: join, Profile: "lan", Logger: quiet}, a.tag)
		if err := a.mem.Start(); err != nil {
			l.Close()
			t.Fatal(err)
		}
		a.srv = grpc.NewServer()
		agentv1.RegisterAgentServer(a.srv, a)
		go func() { _ = a.srv.Serve(l) }()
		wg.Add(1)
		go func() { defer wg.Done(); _ = a.mem.Run(ctx) }()
		agents[i] = a
		time.Sleep(2 * time.Millisecond) // hosts do not boot in one millisecond
	}
	// Every agent is in the leader's view (its /v1/sd/agents lists them,
	// by the metrics address their tags carry; nothing listens there).
	sdURL := "http://" + coordIP(leader) + ":7951/v1/sd/agents"
	deadline = time.Now().Add(3 * time.Minute)
	seen := 0
	joined := time.Now()
	for {
		resp, err := http.Get(sdURL)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if seen = strings.Count(string(b), "\"node\":"); seen >= n {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the leader sees %d of %d agents after 3 minutes", seen, n)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("%d agents: the leader saw them all %.1fs after the last one started", n, time.Since(joined).Seconds())
	replicas := n * 3 / 10
	spec := fmt.Sprintf("apiVersion: shoal/v1\nkind: Deployment\nname: big\nmodel: {source: /models/big}\n"+
		"engine: {kind: ray-vllm, servedModelName: big, tensorParallelSize: 8, pipelineParallelSize: 2}\n"+
		"resources: {nodes: 2, gpusPerNode: 8, gpuModel: H200}\nreplicas: {count: %d}\n", replicas)
	f := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(f, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	pid := procs[leader].Process.Pid
	cpu0, _ := procStat(pid)
	t0 := time.Now()
	var all []string
	for i := 0; i < 3; i++ {
		all = append(all, coordIP(i)+":7950")
	}
	out, err := exec.Command(shoal, "apply", "--insecure", "--coordinator", strings.Join(all, ","), "-f", f).CombinedOutput()
	if err != nil {
		t.Fatalf("apply: %v: %s", err, out)
	}
	last := time.Now()
	for assigned.Load() < int64(2*replicas) {
		if os.Getenv("SHOAL_COORD_SCALE_LOG") != "" && time.Since(last) > time.Second {
			last = time.Now()
			t.Logf("%.0fs: %d of %d members assigned (%d calls)", time.Since(t0).Seconds(), assigned.Load(), 2*replicas, assignCalls.Load())
		}
		if time.Since(t0) > 5*time.Minute {
			t.Fatalf("%d of %d members assigned after 5 minutes", assigned.Load(), 2*replicas)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := scaleResult{agents: n, replicas: replicas, placed: time.Since(t0)}
	cpu1, rss := procStat(pid)
	r.cpu, r.rss = cpu1-cpu0, rss
	time.Sleep(10 * time.Second)
	cpu2, rss2 := procStat(pid)
	r.idleCPU, r.rss = (cpu2-cpu1)/10, max(rss, rss2)
	r.p99, r.mean, r.passes = reconcileP99("http://" + coordIP(leader) + ":7951/metrics")
	t.Logf("assign calls %d, status calls %d", assignCalls.Load(), otherCalls.Load())
	if os.Getenv("SHOAL_COORD_SCALE_LOG") != "" {
		b, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("s%d.log", leader+1)))
		t.Logf("leader's log:\n%s", b)
	}
	return r
}

// TestCoordinatorScale: the coordinator leader (one of three replicated
// servers, each the real binary) with N simulated agents speaking the real
// gossip and Agent API, and a deployment of 0.3·N replicas of 2 nodes:
// time from apply to every member assigned, the reconcile pass's p99 and
// mean, the leader's RSS and CPU; for each N in SHOAL_COORD_SCALE (e.g.
// "100,1000"), with how each grows from the first N. Opt-in (N memberlists
// in this process):
//
//	SHOAL_COORD_SCALE=100,1000 go test -run TestCoordinatorScale -v -timeout 30m ./bench/
//
// or, on a machine without Go, with a test binary and SHOAL_BIN:
//
//	go test -c -o bench.test ./bench/ && go build -o shoal ./cmd/shoal
//	SHOAL_BIN=$PWD/shoal SHOAL_COORD_SCALE=100,1000 ./bench.test -test.run TestCoordinatorScale -test.v
func TestCoordinatorScale(t *testing.T) {
	v := os.Getenv("SHOAL_COORD_SCALE")
	if v == "" {
		t.Skip("set SHOAL_COORD_SCALE=100,1000 to run the coordinator scale test")
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	shoal := os.Getenv("SHOAL_BIN") // a machine without Go: the binary, built elsewhere
	if shoal == "" {
		shoal = filepath.Join(t.TempDir(), "shoal")
		build := exec.Command("go", "build", "-o", shoal, "../cmd/shoal")
		build.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build: %v: %s", err, out)
		}
	}
	var rs []scaleResult
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 10 {
			t.Fatalf("SHOAL_COORD_SCALE=%q: give agent counts ≥ 10, comma-separated", v)
		}
		rs = append(rs, runScale(t, shoal, n))
	}
	fmt.Printf("\n%7s %8s %12s %13s %12s %8s %9s %10s %14s\n", "agents", "replicas", "apply→placed", "reconcile p99", "mean", "passes", "RSS", "CPU (s)", "idle CPU share")
	for _, r := range rs {
		fmt.Printf("%7d %8d %11.2fs %12s %10.1fms %8d %7.0fMB %10.2f %13.1f%%\n", r.agents, r.replicas, r.placed.Seconds(),
			fmt.Sprintf("≤%.1fms", r.p99*1000), r.mean*1000, r.passes, float64(r.rss)/1e6, r.cpu, 100*r.idleCPU)
	}
	if len(rs) > 1 {
		a, b := rs[0], rs[len(rs)-1]
		fmt.Printf("from %d to %d agents (%.0f×): apply→placed %.2f×, reconcile mean %.2f×, RSS %.2f×, idle CPU %.2f×\n", a.agents, b.agents,
			float64(b.agents)/float64(a.agents), b.placed.Seconds()/a.placed.Seconds(), b.mean/a.mean, float64(b.rss)/float64(a.rss), b.idleCPU/max(a.idleCPU, 1e-9))
	}
}
