package replicate

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/spec"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// loopbackAddrs reserves n loopback ports at once (held together, so the
// same port is not handed out twice) and frees them for the servers.
func loopbackAddrs(t *testing.T, n int) []string {
	t.Helper()
	var ls []net.Listener
	var out []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().String())
	}
	for _, l := range ls {
		l.Close()
	}
	return out
}

type cluster struct {
	t       *testing.T
	servers []Server
	dirs    []string
	nodes   []*Node
}

func newCluster(t *testing.T, n int) *cluster {
	c := &cluster{t: t, nodes: make([]*Node, n)}
	for i, a := range loopbackAddrs(t, n) {
		c.servers = append(c.servers, Server{ID: fmt.Sprintf("c%d", i+1), Addr: a})
		c.dirs = append(c.dirs, t.TempDir())
	}
	for i := range n {
		c.start(i)
	}
	t.Cleanup(func() {
		for _, nd := range c.nodes {
			if nd != nil {
				nd.Close()
			}
		}
	})
	return c
}

func (c *cluster) start(i int) {
	c.t.Helper()
	nd, err := Open(Config{ID: c.servers[i].ID, Addr: c.servers[i].Addr, Dir: c.dirs[i], Servers: c.servers})
	if err != nil {
		c.t.Fatal(err)
	}
	c.nodes[i] = nd
}

func (c *cluster) stop(i int) {
	c.nodes[i].Close()
	c.nodes[i] = nil
}

// leader waits for a server that leads (at a confirmed term) and returns its index.
func (c *cluster) leader() int {
	c.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		for i, nd := range c.nodes {
			if nd != nil && nd.Leading() {
				return i
			}
		}
		// Leadership arrives as an event of the node; poll the cheap
		// state while waiting for it (no fixed sleep decides the test).
		for _, nd := range c.nodes {
			if nd != nil {
				select {
				case <-nd.Changes():
				case <-time.After(50 * time.Millisecond):
				}
				break
			}
		}
	}
	c.t.Fatal("no leader within 20 s")
	return -1
}

// caughtUp waits until server i has applied what the leader committed.
func (c *cluster) caughtUp(i, leader int) {
	c.t.Helper()
	want := c.nodes[leader].AppliedIndex()
	deadline := time.Now().Add(10 * time.Second)
	for c.nodes[i].AppliedIndex() < want {
		if time.Now().After(deadline) {
			c.t.Fatalf("server %d applied %d of %d", i, c.nodes[i].AppliedIndex(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func deployment(name string) *spec.Deployment {
	return &spec.Deployment{Name: name, Engine: spec.Engine{Kind: spec.EngineVLLM, ServedModelName: name}, Replicas: spec.Replicas{Count: 1}}
}

func TestWritesReplicateAndSurviveTheLeader(t *testing.T) {
	c := newCluster(t, 3)
	l := c.leader()
	created, err := c.nodes[l].PutDeployment(deployment("a"), "name: a")
	if err != nil || !created {
		t.Fatalf("put: created=%v err=%v", created, err)
	}
	if created, err := c.nodes[l].PutDeployment(deployment("a"), "name: a"); err != nil || created {
		t.Fatalf("second put: created=%v err=%v", created, err)
	}
	g := &store.Group{ID: "a-1", Deployment: "a", Epoch: 3, Members: []store.GroupMember{{NodeID: "n1", GRPC: "127.0.0.1:1"}}}
	if err := c.nodes[l].PutGroup(g); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[l].PutGroups([]*store.Group{{ID: "a-2", Deployment: "a", Epoch: 1}, {ID: "a-3", Deployment: "a", Epoch: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[l].PutGroups([]*store.Group{{ID: "a-4"}, {}}); err == nil {
		t.Fatal("a batch with a group without an id was stored")
	}
	for _, id := range []string{"a-2", "a-3"} {
		if err := c.nodes[l].DeleteGroup(id); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.nodes[l].DeleteDeployment("nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("delete of a missing deployment: %v, want ErrNotFound", err)
	}
	f := (l + 1) % 3
	var nl *ErrNotLeader
	if _, err := c.nodes[f].PutDeployment(deployment("b"), ""); !errors.As(err, &nl) || nl.Leader != c.servers[l].ID {
		t.Fatalf("write on a follower: %v, want ErrNotLeader naming %s", err, c.servers[l].ID)
	}
	c.caughtUp(f, l)
	if rec, err := c.nodes[f].Deployment("a"); err != nil || rec.Spec.Name != "a" {
		t.Fatalf("follower read: %v %v", rec, err)
	}

	// The leader dies: another is elected with every acknowledged write,
	// at a higher term.
	oldTerm := c.nodes[l].LeaderTerm()
	c.stop(l)
	l2 := c.leader()
	if l2 == l || c.nodes[l2].LeaderTerm() <= oldTerm {
		t.Fatalf("new leader %d at term %d (old %d at %d)", l2, c.nodes[l2].LeaderTerm(), l, oldTerm)
	}
	gs, err := c.nodes[l2].Groups()
	if err != nil || len(gs) != 1 || gs[0].Epoch != 3 {
		t.Fatalf("groups after failover: %v %v", gs, err)
	}
	if _, err := c.nodes[l2].PutDeployment(deployment("b"), ""); err != nil {
		t.Fatalf("write after failover: %v", err)
	}
	// The old leader comes back as a follower and catches up.
	c.start(l)
	c.caughtUp(l, c.leader())
	if _, err := c.nodes[l].Deployment("b"); err != nil {
		t.Fatalf("restarted server missed a write: %v", err)
	}
}

func TestQuorumLostWritesFailFast(t *testing.T) {
	c := newCluster(t, 3)
	l := c.leader()
	if _, err := c.nodes[l].PutDeployment(deployment("a"), ""); err != nil {
		t.Fatal(err)
	}
	c.stop((l + 1) % 3)
	c.stop((l + 2) % 3)
	// The leader steps down once it cannot reach a majority; writes then
	// fail with the quorum error, reads still answer.
	deadline := time.Now().Add(10 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		start := time.Now()
		_, err = c.nodes[l].PutDeployment(deployment("b"), "")
		if d := time.Since(start); d > 6*time.Second {
			t.Fatalf("a write without quorum took %v", d)
		}
		var nl *ErrNotLeader
		if errors.As(err, &nl) && nl.Leader == "" {
			break
		}
	}
	var nl *ErrNotLeader
	if !errors.As(err, &nl) || nl.Leader != "" {
		t.Fatalf("write without quorum: %v", err)
	}
	if _, err := c.nodes[l].Deployment("a"); err != nil {
		t.Fatalf("read without quorum: %v", err)
	}
}

func TestSnapshotRestoresOnRestart(t *testing.T) {
	c := newCluster(t, 1)
	l := c.leader()
	for i := range 5 {
		if _, err := c.nodes[l].PutDeployment(deployment(fmt.Sprintf("d%d", i)), ""); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.nodes[l].Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[l].DeleteDeployment("d0"); err != nil {
		t.Fatal(err)
	}
	c.stop(l)
	c.start(l)
	c.leader()
	c.caughtUp(l, l)
	ds, err := c.nodes[l].Deployments()
	if err != nil || len(ds) != 4 {
		t.Fatalf("after restart from snapshot + log: %d deployments, %v", len(ds), err)
	}
}

func TestTakeOverSingleNodeStore(t *testing.T) {
	dir := t.TempDir()
	legacy := filepath.Join(dir, "coordinator.db")
	st, err := store.Open(legacy)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.PutDeployment(deployment("old"), "name: old"); err != nil {
		t.Fatal(err)
	}
	if err := st.PutGroup(&store.Group{ID: "old-1", Deployment: "old", Epoch: 7}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	addrs := loopbackAddrs(t, 2)

	// With others in the initial set it refuses, saying how.
	_, err = Open(Config{ID: "c1", Addr: addrs[0], Dir: filepath.Join(dir, "raft"), Legacy: legacy,
		Servers: []Server{{"c1", addrs[0]}, {"c2", addrs[1]}}})
	if err == nil {
		t.Fatal("a multi-server bootstrap took over a single-node store")
	}
	os.RemoveAll(filepath.Join(dir, "raft"))

	nd, err := Open(Config{ID: "c1", Addr: addrs[0], Dir: filepath.Join(dir, "raft"), Legacy: legacy, Servers: []Server{{"c1", addrs[0]}}})
	if err != nil {
		t.Fatal(err)
	}
	defer nd.Close()
	if rec, err := nd.Deployment("old"); err != nil || rec.SpecYAML != "name: old" {
		t.Fatalf("taken-over deployment: %v %v", rec, err)
	}
	if gs, _ := nd.Groups(); len(gs) != 1 || gs[0].Epoch != 7 {
		t.Fatalf("taken-over groups: %v", gs)
	}
	if _, err := os.Stat(legacy); !os.IsNotExist(err) {
		t.Fatalf("the single-node store is still in place: %v", err)
	}
}

func TestFSMRefusesBadEntries(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f := &fsm{st: st}
	for _, data := range []string{"", "{", `{"op":"put_deployment"}`, `{"op":"put_group","group":{}}`, `{"op":"frobnicate"}`, `{"op":"import"}`, `[1,2]`} {
		r, ok := f.Apply(&raft.Log{Type: raft.LogCommand, Index: 9, Data: []byte(data)}).(result)
		if !ok || r.err() == nil {
			t.Errorf("entry %q applied without an error: %+v", data, r)
		}
	}
	if ds, _ := st.Deployments(); len(ds) != 0 {
		t.Fatalf("bad entries changed the store: %v", ds)
	}
}

func TestParseServers(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want int
		bad  bool
	}{
		{[]string{"a=127.0.0.1:1,b=127.0.0.1:2", "c=h:3"}, 3, false},
		{[]string{""}, 0, false},
		{[]string{"a"}, 0, true},
		{[]string{"=h:1"}, 0, true},
		{[]string{"a=h"}, 0, true},
		{[]string{"a=h:1", "a=h:2"}, 0, true},
	} {
		got, err := ParseServers(tc.in)
		if (err != nil) != tc.bad || len(got) != tc.want {
			t.Errorf("ParseServers(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// TestReadIndexSkipsEntriesTheStoreNeverSees: a new leader's term starts
// with a no-op that no store applies; a read waiting for the read index must
// not wait for the next write.
func TestReadIndexSkipsEntriesTheStoreNeverSees(t *testing.T) {
	c := newCluster(t, 3)
	l := c.leader()
	if _, err := c.nodes[l].PutDeployment(deployment("a"), ""); err != nil {
		t.Fatal(err)
	}
	c.stop(l)
	l2 := c.leader()
	idx, err := c.nodes[l2].ReadIndex()
	if err != nil {
		t.Fatal(err)
	}
	if idx >= c.nodes[l2].raft.CommitIndex() {
		t.Fatalf("read index %d is the commit index %d (the new term's no-op)", idx, c.nodes[l2].raft.CommitIndex())
	}
	for i, nd := range c.nodes {
		if nd == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := nd.WaitApplied(ctx, idx)
		cancel()
		if err != nil {
			t.Fatalf("server %d: %v", i, err)
		}
		if _, err := nd.Deployment("a"); err != nil {
			t.Fatalf("server %d at the read index without the write: %v", i, err)
		}
	}
	if _, err := c.nodes[l2].ReadIndex(); err != nil {
		t.Fatal(err)
	}
	for i, nd := range c.nodes {
		if nd == nil || i == l2 {
			continue
		}
		var nl *ErrNotLeader
		if _, err := nd.ReadIndex(); !errors.As(err, &nl) {
			t.Fatalf("follower %d gave a read index: %v", i, err)
		}
	}
}
