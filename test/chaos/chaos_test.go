package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/internal/testbin"
)

var binDir string

func TestMain(m *testing.M) { testbin.Main(m, &binDir) }

const desired = 2

const chaosSpec = `apiVersion: shoal/v1
kind: Deployment
name: demo
model: {source: /models/demo}
engine: {kind: ray-vllm, servedModelName: demo, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8, gpuModel: H200}
replicas: {count: 2}
`

// suite is one chaos cluster: 5 agent hosts, a coordinator host and a
// router host, each its own network namespace, with production (lan)
// gossip timings, engines that outlive agent restarts, and load throughout.
type suite struct {
	t     *testing.T
	net   *Net
	c     *devcluster.Cluster
	dir   string
	api   string
	load  *Load
	watch *Watch
}

type replica struct {
	GroupID  string   `json:"groupId"`
	Epoch    string   `json:"epoch"`
	State    string   `json:"state"`
	Head     string   `json:"head"`
	Endpoint string   `json:"endpoint"`
	Members  []string `json:"members"`
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("SHOAL_REQUIRE_CHAOS") == "1" {
			t.Fatal("SHOAL_REQUIRE_CHAOS=1 but not root: network namespaces need root")
		}
		t.Skip("network namespaces need root")
	}
	for _, b := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(b); err != nil {
			if os.Getenv("SHOAL_REQUIRE_CHAOS") == "1" {
				t.Fatalf("%s not installed (apt-get install iproute2 iptables)", b)
			}
			t.Skipf("%s not installed", b)
		}
	}
}

func newSuite(t *testing.T) *suite {
	requireRoot(t)
	hosts := map[string]int{"coord": 2, "router": 3}
	for i := 0; i < 5; i++ {
		hosts[devcluster.NodeID(i)] = 11 + i
	}
	n, err := NewNet(hosts)
	require.NoError(t, err)
	t.Cleanup(n.Close)
	s := &suite{t: t, net: n, dir: t.TempDir(), api: n.IP("coord") + ":7950"}
	cfg := devcluster.Config{Dir: s.dir, ShoalBin: filepath.Join(binDir, "shoal"), SimBin: filepath.Join(binDir, "shoal-sim"),
		Agents: 5, IPPrefix: subnet, FirstIP: 11, CoordIP: n.IP("coord"), GossipPort: 7946, APIAddr: s.api,
		RouterAddr: n.IP("coord") + ":8080", SimEnv: []string{"SHOAL_SIM_LOAD_SECONDS=1"}, KeepEngines: true, Profile: "lan",
		Wrap: func(name string) []string {
			if name == "coordinator" {
				return n.Wrap("coord")
			}
			return n.Wrap(name)
		}}
	s.start(cfg)
	return s
}

// start runs cfg's cluster for the suite (stopped, and its logs shown on a
// failure, when the test ends), the standalone router, the engine watch and
// the load, and waits until the demo deployment serves through the router.
func (s *suite) start(cfg devcluster.Config) {
	t, n := s.t, s.net
	c, err := devcluster.Start(cfg)
	require.NoError(t, err)
	s.c = c
	t.Cleanup(func() {
		c.Stop()
		if keep := os.Getenv("SHOAL_CHAOS_LOGS"); keep != "" { // every log, for a post-mortem
			_ = os.MkdirAll(keep, 0o755)
			_ = exec.Command("cp", "-r", filepath.Join(s.dir, "logs"), keep).Run()
		}
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(s.dir, "logs", "*.log"))
			for _, p := range logs {
				b, _ := os.ReadFile(p)
				lines := strings.Split(string(b), "\n")
				t.Logf("---- %s (last lines)\n%s", strings.TrimSuffix(filepath.Base(p), ".log"), strings.Join(lines[max(0, len(lines)-30):], "\n"))
			}
		}
	})
	require.NoError(t, c.StartRouter("router", n.IP("router"), n.IP("router")+":8080"))
	s.watch = NewWatch(func() map[string]string {
		m := map[string]string{}
		for i := 0; i < 5; i++ {
			m[devcluster.NodeID(i)] = filepath.Join(s.dir, "logs", devcluster.NodeID(i)+".log")
		}
		return m
	})
	s.load = NewLoad(n.IP("router") + ":8080")
	f := filepath.Join(s.dir, "demo.yaml")
	require.NoError(t, os.WriteFile(f, []byte(chaosSpec), 0o644))
	require.Eventually(t, func() bool { _, err := s.shoal("apply", "-f", f); return err == nil }, 30*time.Second, 250*time.Millisecond)
	require.Eventually(t, func() bool { return s.ready() == desired && s.probe() }, 90*time.Second, 250*time.Millisecond,
		"the deployment never served through the standalone router")
}

func (s *suite) shoal(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
	cmd.Env = append(os.Environ(), s.c.ClientEnv()...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (s *suite) replicas() []replica {
	out, err := s.shoal("get", "replicas", "-o", "json")
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

func (s *suite) ready() int {
	n := 0
	for _, r := range s.replicas() {
		if r.State == "ready" {
			n++
		}
	}
	return n
}

// probe: concurrent completions through the standalone router succeed and
// reach every replica (the router routes to all of them, not just one).
func (s *suite) probe() bool {
	c := &http.Client{Timeout: 10 * time.Second}
	var mu sync.Mutex
	groups := map[string]bool{}
	ok := true
	var wg sync.WaitGroup
	for i := 0; i < 2*desired; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.Post("http://"+s.net.IP("router")+":8080/v1/completions", "application/json",
				strings.NewReader(`{"model":"demo","prompt":"p","max_tokens":8,"ignore_eos":true}`))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				ok = false
				return
			}
			r.Body.Close()
			ok = ok && r.StatusCode == 200
			groups[r.Header.Get("X-Shoal-Replica")] = true
		}()
	}
	wg.Wait()
	return ok && len(groups) == desired
}

func (s *suite) nodeIndex(id string) int {
	for i := 0; i < 5; i++ {
		if devcluster.NodeID(i) == id {
			return i
		}
	}
	s.t.Fatalf("unknown node %q", id)
	return -1
}

// target picks a serving replica: its group, head and a worker.
func (s *suite) target(rng *rand.Rand) (replica, string) {
	var rs []replica
	for _, r := range s.replicas() {
		if r.State == "ready" {
			rs = append(rs, r)
		}
	}
	require.NotEmpty(s.t, rs)
	sort.Slice(rs, func(i, j int) bool { return rs[i].GroupID < rs[j].GroupID })
	r := rs[rng.Intn(len(rs))]
	for _, m := range r.Members {
		if m != r.Head {
			return r, m
		}
	}
	s.t.Fatalf("replica %s has no worker", r.GroupID)
	return r, ""
}

func (s *suite) headEngine(group string) (headEngine, bool) {
	for _, e := range s.watch.HeadEngines() {
		if e.group == group {
			return e, true
		}
	}
	return headEngine{}, false
}

// fault is what a scenario did.
type fault struct {
	at    time.Time // injection
	heal  time.Time // end of the fault (= at for instantaneous ones)
	group string    // the replica it aimed at
	epoch uint64
	term  uint64 // of its head at the fault
	// failWindow: requests may fail if in flight between at and heal+failWindow.
	failWindow time.Duration
	// headPid is the target's head engine pid, to time its stop.
	headPid int
	// killedHead: the head itself was taken out (time out of routing).
	killedHead bool
	// stops: the fault must stop the target's head engine; the scenario
	// waits for that (30 s at most) before it waits for convergence.
	stops bool
	// check runs scenario-specific invariants after convergence.
	check func() []string
}

type scenario struct {
	name string
	run  func(s *suite, rng *rand.Rand) fault
}

func epochOf(r replica) uint64 { e, _ := strconv.ParseUint(r.Epoch, 10, 64); return e }

func (s *suite) killHost(id string) { require.NoError(s.t, s.c.Kill(id)) }

var scenarios = []scenario{
	{"kill-engine-head", func(s *suite, rng *rand.Rand) fault {
		r, _ := s.target(rng)
		e, ok := s.headEngine(r.GroupID)
		require.True(s.t, ok)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 5 * time.Second, headPid: e.pid, term: e.term, stops: true, killedHead: true}
		require.NoError(s.t, syscall.Kill(e.pid, syscall.SIGKILL))
		f.heal = f.at
		return f
	}},
	{"kill-host-worker", func(s *suite, rng *rand.Rand) fault {
		r, w := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 5 * time.Second, headPid: e.pid, term: e.term, stops: true}
		s.killHost(w)
		f.heal = f.at
		time.Sleep(8 * time.Second)
		require.NoError(s.t, s.c.StartAgent(s.nodeIndex(w)))
		return f
	}},
	{"kill-host-head", func(s *suite, rng *rand.Rand) fault {
		r, _ := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 5 * time.Second, headPid: e.pid, term: e.term, killedHead: true}
		s.killHost(r.Head)
		f.heal = f.at
		time.Sleep(8 * time.Second)
		require.NoError(s.t, s.c.StartAgent(s.nodeIndex(r.Head)))
		return f
	}},
	{"kill-agent-worker", func(s *suite, rng *rand.Rand) fault {
		r, w := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), headPid: e.pid, term: e.term}
		require.NoError(s.t, s.c.KillAgent(s.nodeIndex(w)))
		time.Sleep(time.Second) // systemd's RestartSec=1
		require.NoError(s.t, s.c.StartAgent(s.nodeIndex(w)))
		f.heal = time.Now()
		f.check = func() []string { return s.sameEngine(r.GroupID, e.pid) }
		return f
	}},
	{"restart-agent-head", func(s *suite, rng *rand.Rand) fault {
		r, _ := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), headPid: e.pid, term: e.term}
		before, _ := os.ReadFile(filepath.Join(s.dir, r.Head, "state.json"))
		require.NoError(s.t, s.c.Restart(s.nodeIndex(r.Head)))
		f.heal = time.Now()
		f.check = func() []string {
			bad := s.sameEngine(r.GroupID, e.pid)
			after, _ := os.ReadFile(filepath.Join(s.dir, r.Head, "state.json"))
			if !sameAssignment(before, after) {
				bad = append(bad, "invariant 4: the head's persisted assignment changed across its restart")
			}
			return bad
		}
		return f
	}},
	{"kill-coordinator", func(s *suite, rng *rand.Rand) fault {
		specBefore, err := s.shoal("get", "deployment", "demo", "-o", "json")
		require.NoError(s.t, err)
		groupsBefore := groups(s.replicas())
		f := fault{at: time.Now()}
		s.c.KillCoordinator()
		time.Sleep(5 * time.Second)
		require.NoError(s.t, s.c.StartCoordinator())
		f.heal = time.Now()
		f.check = func() []string {
			var bad []string
			specAfter, err := s.shoal("get", "deployment", "demo", "-o", "json")
			if err != nil || specFields(specAfter) != specFields(specBefore) {
				bad = append(bad, "invariant 4: the deployment spec changed across a coordinator restart")
			}
			if g := groups(s.replicas()); g != groupsBefore {
				bad = append(bad, fmt.Sprintf("invariant 4: assignments changed across a coordinator restart: %s → %s", groupsBefore, g))
			}
			return bad
		}
		return f
	}},
	{"pause-host-worker", func(s *suite, rng *rand.Rand) fault {
		r, w := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 5 * time.Second, headPid: e.pid, term: e.term, stops: true}
		require.NoError(s.t, s.c.SignalHost(s.nodeIndex(w), syscall.SIGSTOP))
		time.Sleep(8 * time.Second)
		require.NoError(s.t, s.c.SignalHost(s.nodeIndex(w), syscall.SIGCONT))
		f.heal = time.Now()
		return f
	}},
	{"partition-head-worker", func(s *suite, rng *rand.Rand) fault {
		r, w := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 5 * time.Second, headPid: e.pid, term: e.term, stops: true}
		require.NoError(s.t, s.net.Drop(r.Head, true, true, w))
		require.NoError(s.t, s.net.Drop(w, true, true, r.Head))
		time.Sleep(10 * time.Second)
		require.NoError(s.t, s.net.Heal())
		f.heal = time.Now()
		return f
	}},
	{"partition-asymmetric", func(s *suite, rng *rand.Rand) fault {
		r, w := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 5 * time.Second, headPid: e.pid, term: e.term, stops: true}
		require.NoError(s.t, s.net.Drop(w, true, false, r.Head)) // the worker stops hearing its head
		time.Sleep(10 * time.Second)
		require.NoError(s.t, s.net.Heal())
		f.heal = time.Now()
		return f
	}},
	{"isolate-coordinator", func(s *suite, rng *rand.Rand) fault {
		groupsBefore := groups(s.replicas())
		f := fault{at: time.Now()}
		require.NoError(s.t, s.net.Isolate("coord"))
		time.Sleep(10 * time.Second)
		require.NoError(s.t, s.net.Heal())
		f.heal = time.Now()
		f.check = func() []string {
			if g := groups(s.replicas()); g != groupsBefore {
				return []string{fmt.Sprintf("an isolated coordinator re-formed healthy groups: %s → %s", groupsBefore, g)}
			}
			return nil
		}
		return f
	}},
	{"engine-hang", func(s *suite, rng *rand.Rand) fault {
		r, _ := s.target(rng)
		e, _ := s.headEngine(r.GroupID)
		f := fault{at: time.Now(), group: r.GroupID, epoch: epochOf(r), failWindow: 12 * time.Second, headPid: e.pid, term: e.term, stops: true}
		resp, err := http.Post("http://"+r.Endpoint+"/shoal-sim/faults", "application/json", strings.NewReader(`{"mode":"hang"}`))
		require.NoError(s.t, err)
		resp.Body.Close()
		f.heal = f.at
		return f
	}},
}

// sameEngine: the group is still served by the engine process it had.
func (s *suite) sameEngine(group string, pid int) []string {
	if e, ok := s.headEngine(group); !ok || e.pid != pid {
		return []string{fmt.Sprintf("group %s's head engine was restarted (pid %d → %d) though only an agent restarted", group, pid, e.pid)}
	}
	return nil
}

func groups(rs []replica) string {
	var g []string
	for _, r := range rs {
		m := append([]string(nil), r.Members...)
		sort.Strings(m)
		g = append(g, r.GroupID+"@"+r.Epoch+"["+strings.Join(m, ",")+"]")
	}
	sort.Strings(g)
	return strings.Join(g, " ")
}

// specFields keeps what `get deployment -o json` says of the spec (name,
// model, engine, nodes, desired replicas, creation time), not the ready count.
func specFields(s string) string {
	var m struct {
		Deployments []map[string]any `json:"deployments"`
	}
	if json.Unmarshal([]byte(s), &m) != nil {
		return s
	}
	for _, d := range m.Deployments {
		delete(d, "readyReplicas")
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func sameAssignment(a, b []byte) bool {
	var x, y struct {
		Assignment json.RawMessage `json:"assignment"`
	}
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && string(x.Assignment) == string(y.Assignment)
}

// result is one scenario's row of the report.
type result struct {
	name                  string
	sent, ok, failed      int
	unexplained           []string
	dual, superseded      []string
	other                 []string
	detect, stop, recover time.Duration
	detected              bool // detect is measured (the head itself was taken out)
	converged             bool
}

func (r result) violations() int {
	n := len(r.unexplained) + len(r.dual) + len(r.superseded) + len(r.other)
	if !r.converged {
		n++
	}
	return n
}

// runScenario injects one fault under load and checks the history.
func (s *suite) runScenario(sc scenario, rng *rand.Rand) result {
	res := result{name: sc.name}
	start := time.Now()
	dualBefore := len(s.watch.Dual())
	// Every replica has requests in flight (the probe made sure the router
	// routes to all of them) when the fault strikes.
	time.Sleep(1500 * time.Millisecond)
	f := sc.run(s, rng)
	if f.stops && f.headPid > 0 {
		if !waitFor(30*time.Second, func() bool { return !s.watch.ExitedAt(f.headPid).IsZero() }) {
			res.other = append(res.other, "the fault never stopped the target's head engine")
		}
	}
	// Invariant 5: the cluster converges back to the desired replicas (for a
	// fault that stopped the target, with a new head engine in its group).
	res.converged = waitFor(120*time.Second, func() bool {
		if f.stops && f.headPid > 0 {
			if e, ok := s.headEngine(f.group); !ok || e.pid == f.headPid {
				return false
			}
		}
		return s.ready() == desired && s.probe()
	})
	res.recover = time.Since(f.heal)
	time.Sleep(2 * time.Second) // the last requests of the window complete
	reqs := s.load.Since(start)
	for _, r := range reqs {
		res.sent++
		if r.OK {
			res.ok++
			continue
		}
		res.failed++
		// Invariant 3: only requests in flight on the failed replica fail.
		if f.failWindow == 0 || r.End.Before(f.at) || r.Start.After(f.heal.Add(f.failWindow)) {
			res.unexplained = append(res.unexplained, fmt.Sprintf("%s→%s %s stream=%v status=%d: %s",
				r.Start.Format("15:04:05.000"), r.End.Format("15:04:05.000"), r.Group, r.Stream, r.Status, firstLine(r.Err)))
		}
	}
	if os.Getenv("SHOAL_CHAOS_TRACE") != "" { // every request around the fault
		for _, r := range reqs {
			if r.End.After(f.at.Add(-time.Second)) && r.Start.Before(f.heal.Add(5*time.Second)) {
				s.t.Logf("trace %s: %s→%s %s e%d t%d stream=%v ok=%v status=%d %s", sc.name, r.Start.Format("05.000"), r.End.Format("05.000"),
					r.Group, r.Epoch, r.Term, r.Stream, r.OK, r.Status, firstLine(r.Err))
			}
		}
	}
	res.dual = s.watch.Dual()[dualBefore:]
	res.superseded = s.watch.Superseded(reqs, time.Second)
	if f.headPid > 0 {
		if t := s.watch.ExitedAt(f.headPid); !t.IsZero() && t.After(f.at) {
			res.stop = t.Sub(f.at)
		}
	}
	if f.killedHead {
		last := f.at
		for _, r := range reqs {
			if r.Group == f.group && r.Epoch == f.epoch && r.Term == f.term && r.Start.After(last) && r.Start.After(f.at) {
				last = r.Start
			}
		}
		res.detect, res.detected = last.Sub(f.at), true
	}
	if f.check != nil {
		res.other = append(res.other, f.check()...)
	}
	return res
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 160 {
		s = s[:160]
	}
	return s
}

func waitFor(d time.Duration, f func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if f() {
			return true
		}
		time.Sleep(250 * time.Millisecond)
	}
	return false
}

// TestChaos runs the fault scenarios (all by default; SHOAL_CHAOS_SCENARIOS
// picks some) SHOAL_CHAOS_ROUNDS times (default 1) in an order drawn from
// SHOAL_CHAOS_SEED, under continuous load, and fails on any invariant
// violation. The report goes to the test log and, with SHOAL_CHAOS_REPORT,
// to that file (`make chaos` writes bench/chaos/REPORT.md).
func TestChaos(t *testing.T) {
	rounds := envInt("SHOAL_CHAOS_ROUNDS", 1)
	seed := int64(envInt("SHOAL_CHAOS_SEED", 1))
	pick := map[string]bool{}
	for _, n := range strings.Split(os.Getenv("SHOAL_CHAOS_SCENARIOS"), ",") {
		if n = strings.TrimSpace(n); n != "" {
			pick[n] = true
		}
	}
	s := newSuite(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.watch.Run(ctx)
	loadDone := make(chan struct{})
	go func() { s.load.Run(ctx, 4); close(loadDone) }()
	defer func() { cancel(); <-loadDone }()

	rng := rand.New(rand.NewSource(seed))
	var plan []scenario
	for r := 0; r < rounds; r++ {
		order := rng.Perm(len(scenarios))
		for _, i := range order {
			if len(pick) == 0 || pick[scenarios[i].name] {
				plan = append(plan, scenarios[i])
			}
		}
	}
	t.Logf("chaos: %d scenarios, %d rounds, seed %d", len(plan), rounds, seed)
	var results []result
	for _, sc := range plan {
		res := s.runScenario(sc, rng)
		t.Logf("%-22s sent %4d ok %4d failed %3d violations %d recover %5.1fs stop %5.2fs detect %5.2fs",
			res.name, res.sent, res.ok, res.failed, res.violations(), res.recover.Seconds(), res.stop.Seconds(), res.detect.Seconds())
		results = append(results, res)
		if !res.converged {
			t.Errorf("%s: the cluster did not converge to %d ready replicas within 120 s", res.name, desired)
			break
		}
	}
	report := renderReport(results, rounds, seed)
	t.Log("\n" + report)
	if p := os.Getenv("SHOAL_CHAOS_REPORT"); p != "" {
		require.NoError(t, os.WriteFile(p, []byte(report), 0o644))
	}
	for _, r := range results {
		for _, v := range append(append(append(r.unexplained, r.dual...), r.superseded...), r.other...) {
			t.Errorf("%s: %s", r.name, v)
		}
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
