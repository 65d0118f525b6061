package sim

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The GCS stand-in speaks JSON lines over TCP on the head's --port. A worker
// registers and keeps its connection open: the connection is its liveness, the
// way a raylet's heartbeat is for the real GCS.
type gcsMsg struct {
	Op     string    `json:"op"`
	NodeIP string    `json:"node_ip,omitempty"`
	NodeID string    `json:"node_id,omitempty"`
	GPUs   float64   `json:"gpus,omitempty"`
	Nodes  []rayNode `json:"nodes,omitempty"`
	Error  string    `json:"error,omitempty"`
}

type rayNode struct {
	ID   string  `json:"id"`
	IP   string  `json:"ip"`
	GPUs float64 `json:"gpus"`
}

// Ray runs the `ray` personality.
func Ray(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "Usage: ray [OPTIONS] COMMAND [ARGS]...\n\nCommands:\n  start   Start Ray processes manually on the local machine.\n  status  Print cluster status, including autoscaling info.\n  stop    Stop Ray processes manually on the local machine.")
		return 2
	}
	switch args[0] {
	case "start":
		return rayStart(ctx, args[1:], stdout, stderr)
	case "status":
		return rayStatus(args[1:], stdout, stderr)
	case "stop":
		return rayStop(args[1:], stdout, stderr)
	case "--version", "version":
		fmt.Fprintln(stdout, "ray, version 2.43.0 (shoal-sim)")
		return 0
	default:
		fmt.Fprintf(stderr, "Error: No such command '%s'.\n", args[0])
		return 2
	}
}

func rayStart(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("ray start", []string{"--node-ip-address", "--port", "--num-gpus", "--num-cpus", "--address",
		"--dashboard-host", "--dashboard-port", "--node-manager-port", "--object-manager-port", "--min-worker-port",
		"--max-worker-port", "--resources", "--temp-dir", "--ray-client-server-port", "--dashboard-agent-listen-port"}, []string{"--head", "--block", "--disable-usage-stats", "--include-dashboard"}, nil)
	if err := fs.parse(args); err != nil {
		fmt.Fprintln(stderr, "Error:", err)
		return 2
	}
	ip := fs.str("--node-ip-address", os.Getenv("RAY_NODE_IP_ADDRESS"))
	if ip == "" {
		ip = "127.0.0.1"
	}
	gpus, err := fs.float("--num-gpus", float64(envInt("SHOAL_SIM_GPUS", 8)))
	if err != nil {
		fmt.Fprintln(stderr, "Error:", err)
		return 2
	}
	if !fs.boolean("--block") {
		fmt.Fprintln(stderr, "shoal-sim: ray start without --block would daemonize; the simulator needs --block")
		return 2
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	writePidFile(ip)
	defer removePidFile(ip)
	id := fmt.Sprintf("%056x", time.Now().UnixNano())[:56]
	if fs.boolean("--head") {
		port, err := fs.integer("--port", 6379)
		if err != nil {
			fmt.Fprintln(stderr, "Error:", err)
			return 2
		}
		return runHead(ctx, ip, port, rayNode{ID: id, IP: ip, GPUs: gpus}, stdout, stderr)
	}
	addr := fs.str("--address", os.Getenv("RAY_ADDRESS"))
	if addr == "" {
		fmt.Fprintln(stderr, "ValueError: --address is required when not starting a head node (--head)")
		return 1
	}
	return runWorker(ctx, addr, rayNode{ID: id, IP: ip, GPUs: gpus}, stdout, stderr)
}

type gcs struct {
	mu       sync.Mutex
	nodes    map[string]rayNode      // guarded by mu
	watchers map[chan []rayNode]bool // guarded by mu
}

func (g *gcs) list() []rayNode {
	out := make([]rayNode, 0, len(g.nodes))
	for _, n := range g.nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].IP < out[j].IP })
	return out
}

func (g *gcs) set(n rayNode, add bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if add {
		g.nodes[n.ID] = n
	} else {
		delete(g.nodes, n.ID)
	}
	l := g.list()
	for w := range g.watchers {
		select {
		case w <- l:
		default:
		}
	}
}

func runHead(ctx context.Context, ip string, port int, self rayNode, stdout, stderr io.Writer) int {
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
	if err != nil {
		fmt.Fprintf(stderr, "ConnectionError: Failed to start GCS server on %s:%d: %v\n", ip, port, err)
		return 1
	}
	g := &gcs{nodes: map[string]rayNode{}, watchers: map[chan []rayNode]bool{}}
	g.set(self, true)
	fmt.Fprintf(stdout, "Local node IP: %s\n\n--------------------\nRay runtime started.\n--------------------\n\n", ip)
	fmt.Fprintf(stdout, "Next steps\n  To add another node to this Ray cluster, run\n    ray start --address='%s:%d'\n\n", ip, port)
	fmt.Fprintln(stdout, "--block\n  This command will now block forever until terminated by a signal.\n  Running subprocesses are monitored and a message will be printed if any of them terminate unexpectedly. Subprocesses exit with SIGTERM will be treated as graceful, thus NOT reported.")
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	var wg sync.WaitGroup
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.serve(ctx, c, stdout)
		}()
	}
	return 0
}

func (g *gcs) serve(ctx context.Context, c net.Conn, log io.Writer) {
	defer c.Close()
	go func() {
		<-ctx.Done()
		c.Close()
	}()
	r := bufio.NewReader(c)
	enc := json.NewEncoder(c)
	line, err := r.ReadBytes('\n')
	if err != nil {
		return
	}
	var m gcsMsg
	if err := json.Unmarshal(line, &m); err != nil {
		_ = enc.Encode(gcsMsg{Op: "error", Error: "bad request"})
		return
	}
	switch m.Op {
	case "register":
		n := rayNode{ID: m.NodeID, IP: m.NodeIP, GPUs: m.GPUs}
		g.set(n, true)
		_ = enc.Encode(gcsMsg{Op: "ok"})
		_, _ = io.Copy(io.Discard, r) // until the worker goes away
		g.set(n, false)
		fmt.Fprintf(log, "(raylet) node %s (%s) is dead: connection lost\n", n.ID[:8], n.IP)
	case "status":
		g.mu.Lock()
		l := g.list()
		g.mu.Unlock()
		_ = enc.Encode(gcsMsg{Op: "status", Nodes: l})
	case "watch":
		ch := make(chan []rayNode, 16)
		g.mu.Lock()
		g.watchers[ch] = true
		ch <- g.list()
		g.mu.Unlock()
		defer func() {
			g.mu.Lock()
			delete(g.watchers, ch)
			g.mu.Unlock()
		}()
		closed := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, r); close(closed) }()
		for {
			select {
			case l := <-ch:
				if enc.Encode(gcsMsg{Op: "nodes", Nodes: l}) != nil {
					return
				}
			case <-closed:
				return
			case <-ctx.Done():
				return
			}
		}
	}
}

func runWorker(ctx context.Context, addr string, self rayNode, stdout, stderr io.Writer) int {
	var c net.Conn
	var err error
	// Like a raylet, retry the GCS for a while before giving up.
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		fmt.Fprintf(stderr, "ConnectionError: Could not find any running Ray instance at %s: %v\n", addr, err)
		return 1
	}
	defer c.Close()
	if err := json.NewEncoder(c).Encode(gcsMsg{Op: "register", NodeIP: self.IP, NodeID: self.ID, GPUs: self.GPUs}); err != nil {
		fmt.Fprintf(stderr, "ConnectionError: register with GCS at %s: %v\n", addr, err)
		return 1
	}
	r := bufio.NewReader(c)
	if _, err := r.ReadBytes('\n'); err != nil {
		fmt.Fprintf(stderr, "ConnectionError: GCS at %s closed the connection: %v\n", addr, err)
		return 1
	}
	fmt.Fprintf(stdout, "Local node IP: %s\n\n--------------------\nRay runtime started.\n--------------------\n", self.IP)
	lost := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, r); close(lost) }()
	select {
	case <-ctx.Done():
		return 0
	case <-lost:
		fmt.Fprintf(stderr, "Some Ray subprocesses exited unexpectedly:\n  raylet [exit code=1]\nThe GCS at %s is gone; this node is exiting.\n", addr)
		return 1
	}
}

// queryGCS asks the GCS at addr for its node list.
func queryGCS(addr string) ([]rayNode, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := json.NewEncoder(c).Encode(gcsMsg{Op: "status"}); err != nil {
		return nil, err
	}
	var m gcsMsg
	if err := json.NewDecoder(c).Decode(&m); err != nil {
		return nil, err
	}
	return m.Nodes, nil
}

func rayStatus(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("ray status", []string{"--address"}, nil, nil)
	if err := fs.parse(args); err != nil {
		fmt.Fprintln(stderr, "Error:", err)
		return 2
	}
	addr := fs.str("--address", os.Getenv("RAY_ADDRESS"))
	if addr == "" {
		fmt.Fprintln(stderr, "ConnectionError: Could not find any running Ray instance. Please specify the one to connect to by setting `--address` flag or `RAY_ADDRESS` environment variable.")
		return 1
	}
	nodes, err := queryGCS(addr)
	if err != nil {
		fmt.Fprintf(stderr, "ConnectionError: Could not find any running Ray instance at %s: %v\n", addr, err)
		return 1
	}
	fmt.Fprint(stdout, FormatRayStatus(time.Now(), nodes))
	return 0
}

// FormatRayStatus renders the report `ray status` prints.
func FormatRayStatus(now time.Time, nodes []rayNode) string {
	var b strings.Builder
	fmt.Fprintf(&b, "======== Autoscaler status: %s ========\n", now.Format("2006-01-02 15:04:05.000000"))
	b.WriteString("Node status\n---------------------------------------------------------------\nActive:\n")
	var gpus float64
	for _, n := range nodes {
		fmt.Fprintf(&b, " 1 node_%s\n", n.ID)
		gpus += n.GPUs
	}
	b.WriteString("Pending:\n (no pending nodes)\nRecent failures:\n (no failures)\n\n")
	b.WriteString("Resources\n---------------------------------------------------------------\nUsage:\n")
	fmt.Fprintf(&b, " 0.0/%.1f CPU\n 0.0/%.1f GPU\n 0B/%.2fTiB memory\n", float64(len(nodes))*224, gpus, float64(len(nodes))*2)
	b.WriteString("\nDemands:\n (no resource demands)\n")
	return b.String()
}

func stateDir(ip string) string {
	base := os.Getenv("SHOAL_SIM_STATE_DIR")
	if base == "" {
		base = filepath.Join(os.TempDir(), "shoal-sim-ray")
	}
	return filepath.Join(base, ip)
}

func writePidFile(ip string) {
	d := stateDir(ip)
	_ = os.MkdirAll(d, 0o755)
	_ = os.WriteFile(filepath.Join(d, strconv.Itoa(os.Getpid())+".pid"), nil, 0o644)
}

func removePidFile(ip string) {
	_ = os.Remove(filepath.Join(stateDir(ip), strconv.Itoa(os.Getpid())+".pid"))
}

// rayStop stops the Ray processes of this node. Real `ray stop` stops every Ray
// process on the machine; the simulator scopes it to the node IP in
// RAY_NODE_IP_ADDRESS so several simulated hosts can share one machine.
func rayStop(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("ray stop", []string{"--grace-period"}, []string{"--force", "-f", "--verbose", "-v"}, map[string]string{"-f": "--force", "-v": "--verbose"})
	if err := fs.parse(args); err != nil {
		fmt.Fprintln(stderr, "Error:", err)
		return 2
	}
	ip := os.Getenv("RAY_NODE_IP_ADDRESS")
	dirs := []string{stateDir(ip)}
	if ip == "" {
		dirs, _ = filepath.Glob(filepath.Join(stateDir(""), "*"))
	}
	sig := syscall.SIGTERM
	if fs.boolean("--force") {
		sig = syscall.SIGKILL
	}
	stopped := 0
	for _, d := range dirs {
		files, _ := filepath.Glob(filepath.Join(d, "*.pid"))
		for _, f := range files {
			pid, err := strconv.Atoi(strings.TrimSuffix(filepath.Base(f), ".pid"))
			if err != nil {
				continue
			}
			if err := syscall.Kill(pid, sig); err == nil || errors.Is(err, syscall.EPERM) {
				stopped++
			}
			_ = os.Remove(f)
		}
	}
	fmt.Fprintf(stdout, "Stopped all %d Ray processes.\n", stopped)
	return 0
}
