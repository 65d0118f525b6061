// Package devcluster starts a whole shoal cluster on one machine as separate
// processes: a coordinator on 127.0.0.1 and agents on their own loopback
// addresses (127.0.0.2, .3, …), each with mock H200 GPUs and the simulator
// standing in for ray and vllm. `shoal dev` and the end-to-end tests use it,
// so the tests exercise exactly what a user runs.
package devcluster

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/security"
)

// Config describes the cluster.
type Config struct {
	Dir      string // everything the cluster writes goes here
	ShoalBin string
	SimBin   string
	Agents   int
	// IPPrefix and FirstIP place agent i on IPPrefix+(FirstIP+i).
	IPPrefix   string
	FirstIP    int
	CoordIP    string
	GossipPort int
	APIAddr    string
	RouterAddr string
	// SimEnv configures the simulator (SHOAL_SIM_* variables) and is also
	// given to the agents (AWS_* for weight pulls, say).
	SimEnv []string
	// KeepEngines starts the agents without --stop-engines-on-exit: a
	// restarted agent adopts the engines its predecessor left running.
	KeepEngines bool
	// AgentArgs are added to every agent's command line.
	AgentArgs []string
	// Wrap, when set, prefixes each process's command line (the chaos suite
	// runs every host in its own network namespace: ip netns exec NS). Name
	// is "coordinator" or the node id. Ports are then not checked here.
	Wrap func(name string) []string
	// MetricsAddr is the coordinator's /metrics and service-discovery
	// address ("" disables it); AgentMetrics gives every agent a /metrics on
	// its IP, port 9400.
	MetricsAddr  string
	AgentMetrics bool
	// ConsoleAddr serves the coordinator's web console there ("" off), in
	// the clear on loopback (HTTPS with ConsoleHTTPS), logged in with
	// ConsoleToken.
	ConsoleAddr  string
	ConsoleHTTPS bool
	// Insecure runs every process with --insecure (cleartext gRPC and
	// gossip) instead of throw-away certificates and a gossip key.
	Insecure bool
	// CheckModels makes agents check local model paths before starting
	// engines; off by default since the simulator reads no weights.
	CheckModels bool
	Profile     string
	Log         io.Writer
	// Servers, when set, run a replicated coordinator of these servers
	// (Raft) instead of the single one: the first is the one CoordIP,
	// GossipPort, APIAddr and RouterAddr describe (its built-in router is
	// the cluster's); the others run no router.
	Servers []Server
}

// Server is one coordinator server of a replicated dev cluster.
type Server struct {
	Name   string // its node id: coordinator-1, …
	IP     string
	Gossip int
	API    string
	Raft   string // host:port
}

// Defaults fills the single-machine defaults `shoal dev` uses.
func (c *Config) Defaults() {
	if c.Agents == 0 {
		c.Agents = 5
	}
	if c.IPPrefix == "" {
		c.IPPrefix = "127.0.0."
	}
	if c.FirstIP == 0 {
		c.FirstIP = 2
	}
	if c.CoordIP == "" {
		c.CoordIP = "127.0.0.1"
	}
	if c.GossipPort == 0 {
		c.GossipPort = 7946
	}
	if c.APIAddr == "" {
		c.APIAddr = "127.0.0.1:7950"
	}
	if c.RouterAddr == "" {
		c.RouterAddr = "127.0.0.1:8080"
	}
	if c.Profile == "" {
		c.Profile = "fast"
	}
	if c.Log == nil {
		c.Log = io.Discard
	}
}

// Cluster is a running dev cluster.
type Cluster struct {
	cfg    Config
	coord  *proc
	coords map[string]*proc // a replicated coordinator's servers
	agents map[string]*proc
	order  []string
	extra  []*proc // standalone routers
}

// proc is a started child; done closes when it has exited.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// NodeID is agent i's id.
func NodeID(i int) string { return fmt.Sprintf("node-%d", i+1) }

// AgentIP is agent i's address.
func (c *Cluster) AgentIP(i int) string { return c.cfg.IPPrefix + strconv.Itoa(c.cfg.FirstIP+i) }

// Start launches the coordinator and the agents. On error it stops what it started.
func Start(cfg Config) (*Cluster, error) {
	cfg.Defaults()
	for _, b := range []string{cfg.ShoalBin, cfg.SimBin} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("%s not found: build it first (make build)", b)
		}
	}
	if cfg.Wrap == nil {
		addrs := []string{cfg.APIAddr, cfg.RouterAddr, net.JoinHostPort(cfg.CoordIP, strconv.Itoa(cfg.GossipPort))}
		if cfg.ConsoleAddr != "" {
			addrs = append(addrs, cfg.ConsoleAddr)
		}
		if err := checkFree(addrs...); err != nil {
			return nil, err
		}
	}
	binDir := filepath.Join(cfg.Dir, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return nil, err
	}
	for _, name := range []string{"ray", "vllm", "python3"} {
		link := filepath.Join(binDir, name)
		_ = os.Remove(link)
		if err := os.Symlink(cfg.SimBin, link); err != nil {
			return nil, err
		}
	}
	c := &Cluster{cfg: cfg, agents: map[string]*proc{}, coords: map[string]*proc{}}
	if err := c.setupSecurity(); err != nil {
		return nil, fmt.Errorf("dev cluster certificates: %w", err)
	}
	if len(cfg.Servers) > 0 {
		for i := range cfg.Servers {
			if err := c.StartServer(i); err != nil {
				c.Stop()
				return nil, err
			}
		}
	} else if err := c.StartCoordinator(); err != nil {
		return nil, err
	}
	for i := 0; i < cfg.Agents; i++ {
		if err := c.StartAgent(i); err != nil {
			c.Stop()
			return nil, err
		}
	}
	return c, nil
}

func checkFree(addrs ...string) error {
	for _, a := range addrs {
		l, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("%s is in use (another shoal dev or coordinator running?): %w", a, err)
		}
		l.Close()
	}
	return nil
}

// StartCoordinator (re)starts the coordinator with its data directory.
func (c *Cluster) StartCoordinator() error {
	sec, err := c.securityArgs("coordinator", nil)
	if err != nil {
		return err
	}
	cfg := c.cfg
	c.coord, err = c.spawn("coordinator", nil, append([]string{"coordinator", "--address", cfg.CoordIP, "--gossip-port", strconv.Itoa(cfg.GossipPort),
		"--api", cfg.APIAddr, "--router", cfg.RouterAddr, "--data-dir", filepath.Join(cfg.Dir, "coordinator"), "--gossip-profile", cfg.Profile,
		"--metrics-addr=" + cfg.MetricsAddr, "--no-api-keys"}, append(sec, c.consoleArgs()...)...)...)
	return err
}

// StartServer (re)starts coordinator server i of a replicated cluster, with
// its data directory.
func (c *Cluster) StartServer(i int) error {
	sv := c.cfg.Servers[i]
	sec, err := c.securityArgs(sv.Name, &security.CertRequest{Role: security.RoleCoordinator, Name: sv.Name, IPs: []string{sv.IP}})
	if err != nil {
		return err
	}
	var list []string
	for _, o := range c.cfg.Servers {
		list = append(list, o.Name+"="+o.Raft)
	}
	router := ""
	if i == 0 {
		router = c.cfg.RouterAddr
	}
	args := []string{"coordinator", "--node-id", sv.Name, "--address", sv.IP, "--gossip-port", strconv.Itoa(sv.Gossip),
		"--join", c.joinList(), "--api", sv.API, "--router=" + router, "--data-dir", filepath.Join(c.cfg.Dir, sv.Name),
		"--gossip-profile", c.cfg.Profile, "--metrics-addr=", "--no-api-keys", "--raft-addr", sv.Raft, "--servers", strings.Join(list, ",")}
	p, err := c.spawn(sv.Name, nil, append(args, sec...)...)
	if err != nil {
		return err
	}
	c.coords[sv.Name] = p
	return nil
}

// KillServer SIGKILLs coordinator server name, as its host dying would.
func (c *Cluster) KillServer(name string) {
	if p := c.coords[name]; p != nil {
		signalAll([]*proc{p}, syscall.SIGKILL)
		waitAll([]*proc{p}, 5*time.Second)
	}
}

// joinList is where processes join the gossip: every coordinator.
func (c *Cluster) joinList() string {
	if len(c.cfg.Servers) == 0 {
		return net.JoinHostPort(c.cfg.CoordIP, strconv.Itoa(c.cfg.GossipPort))
	}
	var out []string
	for _, s := range c.cfg.Servers {
		out = append(out, net.JoinHostPort(s.IP, strconv.Itoa(s.Gossip)))
	}
	return strings.Join(out, ",")
}

// apiList is the coordinator API address(es) a client is given.
func (c *Cluster) apiList() string {
	if len(c.cfg.Servers) == 0 {
		return c.cfg.APIAddr
	}
	var out []string
	for _, s := range c.cfg.Servers {
		out = append(out, s.API)
	}
	return strings.Join(out, ",")
}

// StartRouter starts a standalone `shoal router` named name on ip, listening
// on listen, joined to the coordinator's gossip.
func (c *Cluster) StartRouter(name, ip, listen string) error {
	sec, err := c.securityArgs(name, &security.CertRequest{Role: security.RoleRouter, Name: name, IPs: []string{ip}})
	if err != nil {
		return err
	}
	p, err := c.spawn(name, nil, append([]string{"router", "--address", ip, "--listen", listen, "--node-id", name,
		"--join", c.joinList(), "--gossip-profile", c.cfg.Profile, "--no-api-keys"}, sec...)...)
	if err != nil {
		return err
	}
	c.extra = append(c.extra, p)
	return nil
}

// StartAgent (re)starts agent i.
func (c *Cluster) StartAgent(i int) error {
	id := NodeID(i)
	env := append([]string{"SHOAL_MOCK_GPU_FAULTS=" + c.FaultsFile(i)}, c.cfg.SimEnv...)
	args := []string{"agent", "--node-id", id, "--address", c.AgentIP(i),
		"--join", c.joinList(), "--state-dir", filepath.Join(c.cfg.Dir, id),
		"--gpu-backend", "mock:h200x8", "--ray-bin", filepath.Join(c.cfg.Dir, "bin", "ray"), "--vllm-bin", filepath.Join(c.cfg.Dir, "bin", "vllm"),
		"--python-bin", filepath.Join(c.cfg.Dir, "bin", "python3"),
		"--gossip-profile", c.cfg.Profile, "--stop-grace", "2s", "--restart-backoff", "500ms",
		"--hang-timeout", "4s", "--canary-interval", "3s", "--engine-env", "SHOAL_SIM_STATE_DIR=" + filepath.Join(c.cfg.Dir, "sim")}
	if !c.cfg.KeepEngines {
		args = append(args, "--stop-engines-on-exit")
	}
	for _, kv := range c.cfg.SimEnv {
		args = append(args, "--engine-env", kv) // engines inherit nothing the plan does not name
	}
	args = append(args, c.cfg.AgentArgs...)
	if !c.cfg.CheckModels {
		args = append(args, "--skip-local-model-check") // the simulator reads no weights
	}
	if c.cfg.AgentMetrics {
		args = append(args, "--metrics-addr", net.JoinHostPort(c.AgentIP(i), "9400"))
	}
	sec, err := c.securityArgs(id, agentCert(id, c.AgentIP(i)))
	if err != nil {
		return err
	}
	args = append(args, sec...)
	cmd, err := c.spawn(id, env, args...)
	if err != nil {
		return err
	}
	if _, ok := c.agents[id]; !ok {
		c.order = append(c.order, id)
	}
	c.agents[id] = cmd
	return nil
}

// spawn starts `shoal ARGS…` in its own process group, logging to Dir/logs/NAME.log.
func (c *Cluster) spawn(name string, env []string, args ...string) (*proc, error) {
	logDir := filepath.Join(c.cfg.Dir, "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	lf, err := os.OpenFile(filepath.Join(logDir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(c.cfg.ShoalBin, args...)
	if c.cfg.Wrap != nil {
		w := c.cfg.Wrap(name)
		cmd = exec.Command(w[0], append(append(w[1:], c.cfg.ShoalBin), args...)...)
	}
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	// Own process group: a terminal Ctrl-C reaches only `shoal dev`, which then
	// stops everything in order. Pdeathsig: if dev itself dies, so do they.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); lf.Close(); close(p.done) }()
	fmt.Fprintf(c.cfg.Log, "started %-11s pid %d, log %s\n", name, cmd.Process.Pid, filepath.Join(logDir, name+".log"))
	return p, nil
}

// EnginePids reads the engine process groups agent id recorded in its state
// file, in start order.
func (c *Cluster) EnginePids(id string) []int {
	b, err := os.ReadFile(filepath.Join(c.cfg.Dir, id, "state.json"))
	if err != nil {
		return nil
	}
	var st struct {
		Engines []struct {
			Pid int `json:"pid"`
		} `json:"engines"`
	}
	if json.Unmarshal(b, &st) != nil {
		return nil
	}
	var out []int
	for _, e := range st.Engines {
		out = append(out, e.Pid)
	}
	return out
}

// FaultsFile is where a test appends GPU faults for agent i's mock GPUs
// ("xid GPU CODE", "ecc GPU").
func (c *Cluster) FaultsFile(i int) string { return filepath.Join(c.cfg.Dir, NodeID(i)+"-gpu-faults") }

// Kill SIGKILLs an agent and its engine processes, as a host dying would.
func (c *Cluster) Kill(id string) error {
	p, ok := c.agents[id]
	if !ok {
		return fmt.Errorf("no agent %s", id)
	}
	pids := c.EnginePids(id)
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	for _, p := range pids {
		_ = syscall.Kill(-p, syscall.SIGKILL)
	}
	return nil
}

// Restart stops agent i gracefully (SIGTERM: it stops its engines and leaves
// the cluster, or with KeepEngines leaves them running) and starts it again
// with the same state directory.
func (c *Cluster) Restart(i int) error {
	p, ok := c.agents[NodeID(i)]
	if !ok {
		return fmt.Errorf("no agent %s", NodeID(i))
	}
	signalAll([]*proc{p}, syscall.SIGTERM)
	waitAll([]*proc{p}, 15*time.Second)
	select {
	case <-p.done:
	default:
		return fmt.Errorf("agent %s did not stop within 15 s", NodeID(i))
	}
	return c.StartAgent(i)
}

// CrashAgent SIGKILLs agent i's process only (its engines run on, as after an
// agent crash under systemd's KillMode=process) and starts it again.
func (c *Cluster) CrashAgent(i int) error {
	if err := c.KillAgent(i); err != nil {
		return err
	}
	return c.StartAgent(i)
}

// KillAgent SIGKILLs agent i's process only; its engines run on.
func (c *Cluster) KillAgent(i int) error {
	p, ok := c.agents[NodeID(i)]
	if !ok {
		return fmt.Errorf("no agent %s", NodeID(i))
	}
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("agent %s did not die", NodeID(i))
	}
}

// SignalHost sends sig to agent i and every engine process group it
// recorded (SIGSTOP/SIGCONT pause and resume a whole host).
func (c *Cluster) SignalHost(i int, sig syscall.Signal) error {
	p, ok := c.agents[NodeID(i)]
	if !ok {
		return fmt.Errorf("no agent %s", NodeID(i))
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	for _, e := range c.EnginePids(NodeID(i)) {
		_ = syscall.Kill(-e, sig)
	}
	return nil
}

// AgentPid is agent i's pid.
func (c *Cluster) AgentPid(i int) int {
	if p, ok := c.agents[NodeID(i)]; ok {
		return p.cmd.Process.Pid
	}
	return 0
}

// KillCoordinator SIGKILLs the coordinator, as a control-host failure would.
func (c *Cluster) KillCoordinator() {
	signalAll([]*proc{c.coord}, syscall.SIGKILL)
	waitAll([]*proc{c.coord}, 5*time.Second)
}

// Stop ends the agents (which stop their engines), then the coordinator, then
// anything left. Bounded: about 20 s at most.
func (c *Cluster) Stop() {
	var all []*proc
	for _, id := range c.order {
		all = append(all, c.agents[id])
	}
	signalAll(all, syscall.SIGTERM)
	waitAll(all, 12*time.Second)
	for _, id := range c.order {
		for _, p := range c.EnginePids(id) {
			_ = syscall.Kill(-p, syscall.SIGKILL)
		}
	}
	signalAll(all, syscall.SIGKILL)
	signalAll(c.extra, syscall.SIGKILL)
	coords := []*proc{c.coord}
	for _, p := range c.coords {
		coords = append(coords, p)
	}
	signalAll(coords, syscall.SIGTERM)
	waitAll(coords, 5*time.Second)
	signalAll(coords, syscall.SIGKILL)
	waitAll(append(all, coords...), 3*time.Second)
}

func signalAll(ps []*proc, sig syscall.Signal) {
	for _, p := range ps {
		if p != nil {
			_ = syscall.Kill(-p.cmd.Process.Pid, sig)
		}
	}
}

func waitAll(ps []*proc, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	for _, p := range ps {
		if p == nil {
			continue
		}
		select {
		case <-p.done:
		case <-t.C:
			return
		}
	}
}

// DemoSpec is the deployment `shoal dev` applies: 2 replicas of 2 nodes × 8
// GPUs, TP8×PP2 over Ray, like the seed's DeepSeek-R1 deployment.
const DemoSpec = `apiVersion: shoal/v1
kind: Deployment
name: demo
model:
  source: /models/demo
engine:
  kind: ray-vllm
  servedModelName: demo
  tensorParallelSize: 8
  pipelineParallelSize: 2
  startupTimeoutSeconds: 120
resources:
  nodes: 2
  gpusPerNode: 8
  gpuModel: H200
replicas:
  count: 2
`

// WideEPDemoSpec is `shoal dev --shape wide-ep`: 2 replicas of DeepSeek-R1
// (simulated) as DP16 × EP groups on 2 nodes × 8 GPUs, one API server per
// node (vLLM's hybrid load balancing), routed rank by rank.
const WideEPDemoSpec = `apiVersion: shoal/v1
kind: Deployment
name: demo
model:
  source: /models/deepseek-r1
engine:
  kind: vllm
  servedModelName: demo
  tensorParallelSize: 1
  startupTimeoutSeconds: 120
  dataParallel: {size: 16, sizePerNode: 8, loadBalancing: hybrid}
  expertParallel: {enabled: true, all2allBackend: deepep_low_latency, eplb: {redundantExperts: 32}}
resources:
  nodes: 2
  gpusPerNode: 8
  gpuModel: H200
replicas:
  count: 2
`

// PDDemoSpec is `shoal dev --shape pd`: one deployment served
// disaggregated, a prefill role of 1 replica and a decode role of 2, each
// replica one node × 8 GPUs, the KV moved by vLLM's NixlConnector
// (simulated); routers warm each new pair before routing to it.
const PDDemoSpec = `apiVersion: shoal/v1
kind: Deployment
name: demo
model:
  source: /models/demo
engine:
  kind: vllm
  servedModelName: demo
  tensorParallelSize: 8
  startupTimeoutSeconds: 120
  kvTransfer: {connector: nixl}
resources:
  nodes: 1
  gpusPerNode: 8
  gpuModel: H200
roles:
  prefill:
    replicas: {count: 1}
  decode:
    replicas: {count: 2}
`
