package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
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

	"github.com/shoalhq/shoal/internal/devcluster"
)

// startHA starts three replicated coordinators and n agents on 127.0.<subnet>.x.
func startHA(t *testing.T, subnet, n int) *env {
	ip := fmt.Sprintf("127.0.%d.1", subnet)
	addrs := freeAddrs(t, ip, 10)
	var servers []devcluster.Server
	for i := 0; i < 3; i++ {
		_, gp, _ := net.SplitHostPort(addrs[3*i+1])
		g, _ := strconv.Atoi(gp)
		servers = append(servers, devcluster.Server{Name: fmt.Sprintf("coordinator-%d", i+1), IP: ip, API: addrs[3*i], Gossip: g, Raft: addrs[3*i+2]})
	}
	return startCluster(t, subnet, n, func(c *devcluster.Config) {
		c.Servers = servers
		c.APIAddr, c.GossipPort, c.RouterAddr = servers[0].API, servers[0].Gossip, addrs[9]
	})
}

type coordinators struct {
	Servers []struct {
		NodeID string `json:"nodeId"`
		Leader bool   `json:"leader"`
		Alive  bool   `json:"alive"`
	} `json:"servers"`
	Leader     string `json:"leader"`
	Term       string `json:"term"`
	Replicated bool   `json:"replicated"`
}

func (e *env) coordinators() (coordinators, error) {
	var c coordinators
	out, err := e.shoal("get", "coordinators", "-o", "json")
	if err != nil {
		return c, fmt.Errorf("%v: %s", err, out)
	}
	return c, json.Unmarshal([]byte(out), &c)
}

// leader waits until the coordinators agree on a leader other than not.
func (e *env) leader(not string) coordinators {
	e.t.Helper()
	var c coordinators
	require.Eventually(e.t, func() bool {
		var err error
		c, err = e.coordinators()
		return err == nil && c.Leader != "" && c.Leader != not
	}, 30*time.Second, 50*time.Millisecond, "a leader other than %q", not)
	return c
}

// coordinatorTerm is the Raft term an agent last obeyed (its state file).
func (e *env) coordinatorTerm(node string) uint64 {
	b, err := os.ReadFile(filepath.Join(e.dir, node, "state.json"))
	if err != nil {
		return 0
	}
	var st struct {
		Term uint64 `json:"coordinator_term"`
	}
	_ = json.Unmarshal(b, &st)
	return st.Term
}

// TestReplicatedCoordinatorsFailover: three coordinators in a Raft group
// behind one CLI address list. The leader is SIGKILLed while a standalone
// router serves: no request fails, a new leader accepts writes within
// seconds and places a new replica, and agents obey its term; the old leader
// comes back as a follower. Then the new leader and a host of a replica die
// together: the next leader re-forms that replica on the spare.
func TestReplicatedCoordinatorsFailover(t *testing.T) {
	e := startHA(t, 32, 5)
	c := e.leader("")
	require.True(t, c.Replicated)
	require.Len(t, c.Servers, 3)
	e.apply("one.yaml", strings.Replace(spec2x2, "count: 2", "count: 1", 1))
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 90*time.Second, 200*time.Millisecond)
	term0, _ := strconv.ParseUint(c.Term, 10, 64)
	for _, m := range e.replicas()[0].Members {
		require.Equal(t, term0, e.coordinatorTerm(m), "the assignment carried the leader's term")
	}

	listen := e.startRouter("127.0.32.1")
	client := openai.NewClient(option.WithBaseURL("http://"+listen+"/v1/"), option.WithAPIKey("x"), option.WithMaxRetries(0))
	params := openai.ChatCompletionNewParams{Model: "demo", MaxTokens: openai.Int(4),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.Eventually(t, func() bool { _, err := client.Chat.Completions.New(ctx, params); return err == nil }, 60*time.Second, 200*time.Millisecond)

	// Traffic through the router for the whole failover.
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := client.Chat.Completions.New(ctx, params); err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			} else {
				ok.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	// The leader dies; the other two elect one that takes writes.
	killed := time.Now()
	e.c.KillServer(c.Leader)
	f := filepath.Join(e.dir, "two.yaml")
	require.NoError(t, os.WriteFile(f, []byte(spec2x2), 0o644)) // count: 2
	var took time.Duration
	require.Eventually(t, func() bool {
		_, err := e.shoal("apply", "-f", f)
		took = time.Since(killed)
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "a write through the address list after the leader died")
	t.Logf("leader %s killed: writes accepted again after %v", c.Leader, took)
	c2 := e.leader(c.Leader)
	term1, _ := strconv.ParseUint(c2.Term, 10, 64)
	require.Greater(t, term1, term0)

	// The new leader places the second replica; its members obey term1.
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 2 }, 90*time.Second, 200*time.Millisecond)
	for _, r := range e.replicas() {
		for _, m := range r.Members {
			if e.coordinatorTerm(m) == term1 {
				goto fenced
			}
		}
	}
	t.Fatal("no agent obeyed the new leader's term")
fenced:
	close(stop)
	wg.Wait()
	require.Zero(t, failed.Load(), "no request failed through the leader change (first: %v)", firstErr.Load())
	require.Greater(t, ok.Load(), int64(10))

	// The old leader returns as a follower with both deployments' writes.
	idx := -1
	for i, s := range []string{"coordinator-1", "coordinator-2", "coordinator-3"} {
		if s == c.Leader {
			idx = i
		}
	}
	require.NoError(t, e.c.StartServer(idx))
	require.Eventually(t, func() bool {
		c3, err := e.coordinators()
		if err != nil || c3.Leader != c2.Leader {
			return false
		}
		for _, s := range c3.Servers {
			if !s.Alive {
				return false
			}
		}
		return true
	}, 30*time.Second, 100*time.Millisecond, "the old leader is back, as a follower")

	// A host of a replica dies together with the new leader: the next leader
	// re-forms that replica on the spare.
	var rs []replica
	require.Eventually(t, func() bool { rs = e.replicas(); return len(rs) == 2 && readyCount(rs) == 2 }, 30*time.Second, 100*time.Millisecond,
		"both replicas listed and serving")
	victim := rs[0].Members[1]
	killed = time.Now()
	e.c.KillServer(c2.Leader)
	require.NoError(t, e.c.Kill(victim))
	c4 := e.leader(c2.Leader)
	elected := time.Since(killed)
	require.Eventually(t, func() bool {
		rs := e.replicas()
		if readyCount(rs) != 2 {
			return false
		}
		for _, r := range rs {
			for _, m := range r.Members {
				if m == victim {
					return false
				}
			}
		}
		return true
	}, 90*time.Second, 100*time.Millisecond, "the replica re-formed without %s", victim)
	t.Logf("leader %s and host %s killed together: leader %s after %v, both replicas serving again after %v",
		c2.Leader, victim, c4.Leader, elected, time.Since(killed))
}

// TestGrowingAGroupServerByServer: a single coordinator's store is taken
// over by a one-server Raft group; a fresh server joins it with add-peer
// and has every deployment; a server of another group (same gossip, its
// own Raft state) and one not in the gossip are refused, saying why.
func TestGrowingAGroupServerByServer(t *testing.T) {
	ip := "127.0.33.1"
	dir := t.TempDir()
	a := freeAddrs(t, ip, 12)
	type srv struct{ id, api, gossip, raft, data string }
	mk := func(i int, id string) srv {
		return srv{id, a[4*i], a[4*i+1], a[4*i+2], filepath.Join(dir, id)}
	}
	s1, s2, s9 := mk(0, "c1"), mk(1, "c2"), mk(2, "c9")
	var procs []*exec.Cmd
	t.Cleanup(func() {
		for _, p := range procs {
			_ = p.Process.Kill()
			_ = p.Wait()
		}
	})
	start := func(s srv, extra ...string) {
		_, gp, _ := net.SplitHostPort(s.gossip)
		args := append([]string{"coordinator", "--insecure", "--node-id", s.id, "--address", ip, "--gossip-port", gp, "--join", s1.gossip,
			"--api", s.api, "--metrics-addr=", "--router=", "--data-dir", s.data, "--gossip-profile", "fast"}, extra...)
		cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
		logf, err := os.Create(filepath.Join(dir, s.id+".log"))
		require.NoError(t, err)
		cmd.Stdout, cmd.Stderr = logf, logf
		require.NoError(t, cmd.Start())
		procs = append(procs, cmd)
	}
	cli := func(addr string, args ...string) (string, error) {
		cmd := exec.Command(filepath.Join(binDir, "shoal"), append(args, "--insecure", "--coordinator", addr)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	spec := filepath.Join(dir, "one.yaml")
	require.NoError(t, os.WriteFile(spec, []byte(strings.Replace(spec2x2, "count: 2", "count: 1", 1)), 0o644))

	// A single coordinator with a deployment, then the same data directory
	// as a one-server group: the deployment is taken over.
	start(s1)
	require.Eventually(t, func() bool { _, err := cli(s1.api, "apply", "-f", spec); return err == nil }, 20*time.Second, 100*time.Millisecond)
	_ = procs[0].Process.Kill()
	_ = procs[0].Wait()
	procs = procs[:0]
	start(s1, "--raft-addr", s1.raft, "--servers", "c1="+s1.raft)
	require.Eventually(t, func() bool {
		out, err := cli(s1.api, "get", "deployments")
		return err == nil && strings.Contains(out, "demo")
	}, 20*time.Second, 100*time.Millisecond, "the single coordinator's deployment, taken over")
	_, err := os.Stat(filepath.Join(s1.data, "coordinator.db.imported"))
	require.NoError(t, err, "the single-node store is moved aside")

	start(s2, "--raft-addr", s2.raft)                             // waits to be added
	start(s9, "--raft-addr", s9.raft, "--servers", "c9="+s9.raft) // a group of its own
	var out string
	if !assertEventually(func() bool {
		out, err = cli(s1.api, "operator", "raft", "add-peer", "c9", s9.raft)
		return strings.Contains(out, "already belongs to another Raft group")
	}, 20*time.Second) {
		t.Fatalf("add-peer of another group's server: %s", out)
	}
	out, _ = cli(s1.api, "operator", "raft", "add-peer", "c7", "127.0.33.9:7960")
	require.Contains(t, out, "is not in this cluster's gossip")
	if !assertEventually(func() bool {
		out, err = cli(s1.api, "operator", "raft", "add-peer", "c2", s2.raft)
		return err == nil
	}, 20*time.Second) {
		t.Fatalf("add-peer of a fresh server: %s", out)
	}
	require.Eventually(t, func() bool {
		out, err := cli(s2.api, "get", "deployments")
		return err == nil && strings.Contains(out, "demo")
	}, 20*time.Second, 100*time.Millisecond, "the added server has the group's deployments")
	out, err = cli(s1.api+","+s2.api, "operator", "raft", "list-peers")
	require.NoError(t, err, out)
	require.Contains(t, out, "c1")
	require.Contains(t, out, "c2")
	require.NotContains(t, out, "c9")
}
