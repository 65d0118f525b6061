package gossip

import (
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func freePort(t *testing.T, ip string) int {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startNode(t *testing.T, cluster, id, ip string, join []string) (*Membership, context.CancelFunc) {
	t.Helper()
	port := freePort(t, ip)
	m := New(Config{Cluster: cluster, BindAddr: ip, BindPort: port, Join: join, Profile: "fast"},
		Tag{Kind: KindAgent, ID: id, GRPC: fmt.Sprintf("%s:%d", ip, port+1), Healthy: true})
	require.NoError(t, m.Start())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = m.Run(ctx); close(done) }()
	return m, func() { cancel(); <-done }
}

func TestMembershipTagsAndFailure(t *testing.T) {
	a, stopA := startNode(t, "c1", "a", "127.0.0.11", nil)
	defer stopA()
	b, stopB := startNode(t, "c1", "b", "127.0.0.12", []string{a.Addr()})
	c, stopC := startNode(t, "c1", "c", "127.0.0.13", []string{a.Addr()})
	defer stopC()
	require.Eventually(t, func() bool { return len(a.Members()) == 3 && len(c.Members()) == 3 }, 5*time.Second, 20*time.Millisecond)

	tag := b.Local()
	tag.Group, tag.Epoch = "g1", 4
	require.NoError(t, b.SetTag(tag))
	require.Eventually(t, func() bool { return a.Members()["b"].Group == "g1" && a.Members()["b"].Epoch == 4 }, 5*time.Second, 20*time.Millisecond)

	// b stops abruptly (no Leave): the others drop it by failure detection.
	b.Crash()
	stopB()
	start := time.Now()
	require.Eventually(t, func() bool { _, ok := a.Members()["b"]; return !ok }, 10*time.Second, 20*time.Millisecond)
	t.Logf("failure detected in %v", time.Since(start))
	select {
	case <-a.Changes():
	default:
		t.Fatal("no change notification")
	}
}

func TestOtherClusterRejected(t *testing.T) {
	a, stopA := startNode(t, "c1", "a", "127.0.0.14", nil)
	defer stopA()
	port := freePort(t, "127.0.0.15")
	x := New(Config{Cluster: "c2", BindAddr: "127.0.0.15", BindPort: port, Profile: "fast"},
		Tag{Kind: KindAgent, ID: "x", GRPC: "127.0.0.15:1"})
	require.NoError(t, x.Start())
	defer x.ml.Shutdown()
	n, err := x.ml.Join([]string{a.Addr()})
	require.Error(t, err)
	require.Zero(t, n)
	time.Sleep(300 * time.Millisecond)
	require.Len(t, a.Members(), 1)
}

func TestSetTagTooBig(t *testing.T) {
	m := New(Config{Cluster: "c"}, Tag{Kind: KindAgent, ID: "a", GRPC: "127.0.0.1:1"})
	big := m.Local()
	for i := 0; i < 60; i++ {
		big.Deployment += "0123456789"
	}
	require.Error(t, m.SetTag(big))
	require.Empty(t, m.Local().Deployment, "rejected tag is not kept")
}

// TestRejoinAfterRestart: a seed (the coordinator) restarts knowing nobody;
// with the addresses it saw before (Rejoin) it has the whole member list at
// once, and with only dead ones it still starts.
func TestRejoinAfterRestart(t *testing.T) {
	seed, stopSeed := startNode(t, "rj", "seed", "127.0.0.31", nil)
	a, stopA := startNode(t, "rj", "a", "127.0.0.32", []string{seed.Addr()})
	defer stopA()
	b, stopB := startNode(t, "rj", "b", "127.0.0.33", []string{seed.Addr()})
	defer stopB()
	require.Eventually(t, func() bool { return len(seed.Members()) == 3 }, 5*time.Second, 20*time.Millisecond)
	peers := seed.PeerAddrs()
	require.ElementsMatch(t, []string{a.Addr(), b.Addr()}, peers)
	port := seed.ml.LocalNode().Port
	seed.Crash()
	stopSeed()

	again := New(Config{Cluster: "rj", BindAddr: "127.0.0.31", BindPort: int(port), Profile: "fast", Rejoin: append(peers, "127.0.0.39:1")},
		Tag{Kind: KindCoordinator, ID: "seed", Healthy: true})
	require.NoError(t, again.Start())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = again.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	select {
	case <-again.Joined():
	case <-time.After(time.Second):
		t.Fatal("a node with rejoin addresses (and no seeds) must start at once")
	}
	start := time.Now()
	require.Eventually(t, func() bool { return len(again.Members()) == 3 }, 3*time.Second, 10*time.Millisecond)
	t.Logf("restarted seed saw every member %v after start", time.Since(start))
}

func TestPeerFileSaveLoad(t *testing.T) {
	a, stopA := startNode(t, "pf", "a", "127.0.0.34", nil)
	defer stopA()
	b, stopB := startNode(t, "pf", "b", "127.0.0.35", []string{a.Addr()})
	defer stopB()
	require.Eventually(t, func() bool { return a.Count() == 2 }, 5*time.Second, 10*time.Millisecond)
	p := &PeerFile{Path: t.TempDir() + "/sub/peers.json"}
	require.Nil(t, p.Load(), "no file yet")
	require.NoError(t, p.Save(a))
	require.Equal(t, []string{b.Addr()}, p.Load())
	require.NoError(t, os.WriteFile(p.Path, []byte("{not json"), 0o600))
	require.NoError(t, p.Save(a), "a second save within the interval does not read the members again")
	require.Nil(t, p.Load(), "a corrupt file is ignored, not fatal")
}

// A member that lost sight of the cluster gets it back by joining a peer it
// remembers.
func TestJoinRemembered(t *testing.T) {
	a := New(Config{Cluster: "c", BindAddr: "127.0.0.81", BindPort: freePort(t, "127.0.0.81"), Profile: "fast"},
		Tag{Kind: KindAgent, ID: "a", GRPC: "127.0.0.81:1", Healthy: true})
	b := New(Config{Cluster: "c", BindAddr: "127.0.0.82", BindPort: freePort(t, "127.0.0.82"), Profile: "fast"},
		Tag{Kind: KindAgent, ID: "b", GRPC: "127.0.0.82:1", Healthy: true})
	for _, m := range []*Membership{a, b} {
		require.NoError(t, m.Start())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{}, 2)
	for _, m := range []*Membership{a, b} {
		go func() { _ = m.Run(ctx); done <- struct{}{} }()
	}
	defer func() { cancel(); <-done; <-done }()
	n, err := b.Join([]string{"127.0.0.1:1", a.Addr()}) // one dead address, one live
	require.NoError(t, err)
	require.Equal(t, 1, n)
	for _, m := range []*Membership{a, b} {
		for m.Count() < 2 {
			<-m.Changes()
		}
	}
	_, err = b.Join([]string{"127.0.0.1:1"})
	require.Error(t, err, "nobody answered")
}

type peerList []string

func (l peerList) PeerAddrs() []string { return append([]string(nil), l...) }

// The first peers are written at once (a node restarting right after it
// formed its cluster finds it again); later changes at most every 10 s.
func TestPeerFileWritesTheFirstPeersAtOnce(t *testing.T) {
	p := &PeerFile{Path: t.TempDir() + "/peers.json"}
	require.NoError(t, p.Save(peerList(nil)))
	require.Nil(t, p.Load(), "nobody yet: nothing written")
	require.NoError(t, p.Save(peerList{"10.0.0.2:7946"}))
	require.Equal(t, []string{"10.0.0.2:7946"}, p.Load(), "the first peer is written without waiting")
	require.NoError(t, p.Save(peerList{"10.0.0.2:7946", "10.0.0.3:7946"}))
	require.Equal(t, []string{"10.0.0.2:7946"}, p.Load(), "a change within 10 s waits")
	p.at = p.at.Add(-peerSaveEvery)
	require.NoError(t, p.Save(peerList{"10.0.0.3:7946", "10.0.0.2:7946"}))
	require.Equal(t, []string{"10.0.0.2:7946", "10.0.0.3:7946"}, p.Load())
}
