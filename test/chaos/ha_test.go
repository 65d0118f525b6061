package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/security"
)

// haSuite is a chaos cluster with three replicated coordinators, each on its
// own host (network namespace), five agents and a router host.
type haSuite struct {
	*suite
	servers []devcluster.Server
	hostOf  map[string]string // server name → host
}

func newHASuite(t *testing.T) *haSuite {
	requireRoot(t)
	hosts := map[string]int{"coord-1": 2, "coord-2": 4, "coord-3": 5, "router": 3}
	for i := 0; i < 5; i++ {
		hosts[devcluster.NodeID(i)] = 11 + i
	}
	n, err := NewNet(hosts)
	require.NoError(t, err)
	t.Cleanup(n.Close)
	h := &haSuite{hostOf: map[string]string{}}
	for i := 1; i <= 3; i++ {
		host, ip := fmt.Sprintf("coord-%d", i), n.IP(fmt.Sprintf("coord-%d", i))
		name := fmt.Sprintf("coordinator-%d", i)
		h.servers = append(h.servers, devcluster.Server{Name: name, IP: ip, Gossip: 7946, API: ip + ":7950", Raft: ip + ":7960"})
		h.hostOf[name] = host
	}
	s := &suite{t: t, net: n, dir: t.TempDir(), api: h.servers[0].API}
	h.suite = s
	cfg := devcluster.Config{Dir: s.dir, ShoalBin: filepath.Join(binDir, "shoal"), SimBin: filepath.Join(binDir, "shoal-sim"),
		Agents: 5, IPPrefix: subnet, FirstIP: 11, CoordIP: h.servers[0].IP, GossipPort: 7946, APIAddr: h.servers[0].API,
		RouterAddr: h.servers[0].IP + ":8080", SimEnv: []string{"SHOAL_SIM_LOAD_SECONDS=1"}, KeepEngines: true, Profile: "lan",
		Servers: h.servers,
		Wrap: func(name string) []string {
			if host, ok := h.hostOf[name]; ok {
				return n.Wrap(host)
			}
			return n.Wrap(name)
		}}
	s.start(cfg)
	return h
}

type raftView struct {
	Leader  string `json:"leader"`
	Term    string `json:"term"`
	Servers []struct {
		NodeID string `json:"nodeId"`
		Alive  bool   `json:"alive"`
	} `json:"servers"`
}

// leader waits for a leader that all of servers agree on (other than not),
// asking each of them alone.
func (h *haSuite) leader(not string, servers ...devcluster.Server) raftView {
	h.t.Helper()
	if len(servers) == 0 {
		servers = h.servers
	}
	var v raftView
	require.Eventually(h.t, func() bool {
		lead := ""
		for _, sv := range servers {
			out, err := h.shoal("get", "coordinators", "-o", "json", "--coordinator", sv.API)
			if err != nil || json.Unmarshal([]byte(out), &v) != nil || v.Leader == "" || v.Leader == not || (lead != "" && v.Leader != lead) {
				return false
			}
			lead = v.Leader
		}
		return true
	}, 40*time.Second, 100*time.Millisecond, "a leader other than %q", not)
	return v
}

func (h *haSuite) server(name string) (int, devcluster.Server) {
	for i, s := range h.servers {
		if s.Name == name {
			return i, s
		}
	}
	h.t.Fatalf("no server %q", name)
	return -1, devcluster.Server{}
}

func (h *haSuite) others(name string) []devcluster.Server {
	var out []devcluster.Server
	for _, s := range h.servers {
		if s.Name != name {
			out = append(out, s)
		}
	}
	return out
}

// conns are gRPC connections to each server alone, as the CLI.
func (h *haSuite) conns() []*grpc.ClientConn {
	tl, err := security.Load(security.Options{Dir: h.c.ClientTLSDir(), Role: security.RoleCLI})
	require.NoError(h.t, err)
	var out []*grpc.ClientConn
	for _, s := range h.servers {
		c, err := tl.Dial(s.API)
		require.NoError(h.t, err)
		h.t.Cleanup(func() { c.Close() })
		out = append(out, c)
	}
	return out
}

// agentTerms are the coordinator terms the agents last obeyed.
func (h *haSuite) agentTerms() map[string]uint64 {
	out := map[string]uint64{}
	for i := 0; i < 5; i++ {
		id := devcluster.NodeID(i)
		b, _ := os.ReadFile(filepath.Join(h.dir, id, "state.json"))
		var st struct {
			Term uint64 `json:"coordinator_term"`
		}
		_ = json.Unmarshal(b, &st)
		out[id] = st.Term
	}
	return out
}

// TestChaosReplicatedCoordinators: three coordinators on three hosts,
// faults of the Raft group under request load through a standalone router
// and under apply/get/delete traffic recorded for a linearizability check:
// kill -9 the leader, partition the leader from the other servers (a
// minority leader), partition one follower, restart all servers, wipe one
// server's disk and let it rejoin. After each: the deployment serves its
// replicas again, every agent obeys a term no newer than the leader's and
// no agent is in two groups; at the end, the recorded history is
// linearizable (porcupine), no request through the router failed, and no
// deployment was lost.
func TestChaosReplicatedCoordinators(t *testing.T) {
	h := newHASuite(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.watch.Run(ctx)
	loadDone := make(chan struct{})
	go func() { h.load.Run(ctx, 4); close(loadDone) }()
	hist := NewHistory()
	w := &Writer{Conns: h.conns(), Keys: 4, Hist: hist, GPUModel: "A100"}
	wctx, stopWriter := context.WithCancel(ctx)
	writerDone := make(chan struct{})
	go func() { w.Run(wctx, 3, 1); close(writerDone) }()
	start := time.Now()
	defer func() { cancel(); <-loadDone; stopWriter(); <-writerDone }()

	type step struct {
		name string
		run  func() time.Duration // what it measured (0: nothing)
	}
	var lines []string
	v := h.leader("")
	steps := []step{
		{"kill-leader", func() time.Duration {
			i, _ := h.server(v.Leader)
			t0 := time.Now()
			h.c.KillServer(v.Leader)
			nv := h.leader(v.Leader, h.others(v.Leader)...)
			took := time.Since(t0)
			require.NoError(t, h.c.StartServer(i))
			v = h.leader("")
			require.Equal(t, nv.Leader, v.Leader)
			return took
		}},
		{"partition-leader", func() time.Duration {
			old := v.Leader
			host := h.hostOf[old]
			var peers []string
			for _, o := range h.others(old) {
				peers = append(peers, h.hostOf[o.Name])
			}
			t0 := time.Now()
			require.NoError(t, h.net.Drop(host, true, true, peers...))
			nv := h.leader(old, h.others(old)...) // the majority side elects one
			took := time.Since(t0)
			time.Sleep(3 * time.Second) // the minority side runs on, deposed
			require.NoError(t, h.net.Heal())
			v = h.leader("")
			require.Equal(t, nv.Leader, v.Leader)
			return took
		}},
		{"partition-follower", func() time.Duration {
			var f devcluster.Server
			for _, s := range h.servers {
				if s.Name != v.Leader {
					f = s
					break
				}
			}
			var peers []string
			for _, o := range h.others(f.Name) {
				peers = append(peers, h.hostOf[o.Name])
			}
			require.NoError(t, h.net.Drop(h.hostOf[f.Name], true, true, peers...))
			time.Sleep(6 * time.Second)
			require.NoError(t, h.net.Heal())
			v = h.leader("")
			return 0
		}},
		{"restart-all", func() time.Duration {
			for _, s := range h.servers {
				h.c.KillServer(s.Name)
			}
			t0 := time.Now()
			for i := range h.servers {
				require.NoError(t, h.c.StartServer(i))
			}
			v = h.leader("")
			return time.Since(t0)
		}},
		{"wipe-follower-disk", func() time.Duration {
			var i int
			var f devcluster.Server
			for j, s := range h.servers {
				if s.Name != v.Leader {
					i, f = j, s
					break
				}
			}
			h.c.KillServer(f.Name)
			require.NoError(t, os.RemoveAll(filepath.Join(h.dir, f.Name)))
			t0 := time.Now()
			require.NoError(t, h.c.StartServer(i))
			// It catches up from the leader: a read through it alone
			// sees the deployment (it waits for the read index).
			require.Eventually(t, func() bool {
				out, err := h.shoal("get", "deployment", "demo", "--coordinator", f.API)
				return err == nil && strings.Contains(out, "demo")
			}, 40*time.Second, 200*time.Millisecond)
			took := time.Since(t0)
			v = h.leader("")
			return took
		}},
	}
	for _, st := range steps {
		at := time.Now()
		took := st.run()
		require.True(t, waitFor(120*time.Second, func() bool { return h.ready() == desired && h.probe() }),
			"%s: the deployment did not serve %d replicas again", st.name, desired)
		term, _ := strconv.ParseUint(v.Term, 10, 64)
		for id, at := range h.agentTerms() {
			require.LessOrEqual(t, at, term, "%s: agent %s obeyed term %d, newer than the leader's %d", st.name, id, at, term)
		}
		member := map[string]string{}
		for _, r := range h.replicas() {
			for _, m := range r.Members {
				require.Empty(t, member[m], "%s: %s is in two groups (%s, %s)", st.name, m, member[m], r.GroupID)
				member[m] = r.GroupID
			}
		}
		line := fmt.Sprintf("%-20s leader %s term %d, serving again %.1fs after the fault", st.name, v.Leader, term, time.Since(at).Seconds())
		if took > 0 {
			line += fmt.Sprintf(", measured %.2fs", took.Seconds())
		}
		t.Log(line)
		lines = append(lines, line)
	}
	stopWriter()
	<-writerDone
	if p := os.Getenv("SHOAL_CHAOS_HISTORY"); p != "" {
		require.NoError(t, hist.Save(p))
	}
	res, n, dropped := hist.Check(2 * time.Minute)
	t.Logf("linearizability: %v over %d operations (%d reads answered from an unconfirmed state or failed, left out); failed writes: %v",
		res, n, dropped, hist.Errors())
	require.Equal(t, porcupine.Ok, res, "the coordinator API's history is not linearizable:\n%s", hist.Explain())
	require.Greater(t, n, 100, "too few operations to mean anything")
	reqs := h.load.Since(start)
	failed := 0
	for _, r := range reqs {
		if !r.OK {
			failed++
			t.Errorf("request %s→%s failed: status %d %s", r.Start.Format("15:04:05.000"), r.End.Format("15:04:05.000"), r.Status, firstLine(r.Err))
		}
	}
	t.Logf("requests through the router: %d sent, %d failed", len(reqs), failed)
	out, err := h.shoal("get", "deployments")
	require.NoError(t, err)
	require.Contains(t, out, "demo", "the deployment survived every fault")
	sort.Strings(lines)
	if p := os.Getenv("SHOAL_CHAOS_HA_REPORT"); p != "" {
		require.NoError(t, os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o644))
	}
}
