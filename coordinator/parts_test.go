package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/spec"
)

func TestEventsSkipRepeatsAndKeepTheLatest(t *testing.T) {
	e := newEvents()
	require.True(t, e.add("d", "k", "placed %s", "a"))
	require.False(t, e.add("d", "k", "placed %s", "a"), "the same text under one key is said once")
	require.True(t, e.add("d", "k", "placed %s", "b"))
	require.True(t, e.add("d", "", "no key: always"))
	require.True(t, e.add("d", "", "no key: always"))
	require.Len(t, e.list("d"), 4)
	for i := 0; i < 2*eventsPerDeployment; i++ {
		e.add("d", "", "event %d", i)
	}
	l := e.list("d")
	require.Len(t, l, eventsPerDeployment)
	require.True(t, strings.HasSuffix(l[len(l)-1], fmt.Sprintf("event %d", 2*eventsPerDeployment-1)), "the newest are kept")
	require.Empty(t, e.list("other"))
}

func TestAPIErrorMapping(t *testing.T) {
	require.NoError(t, apiError(nil))
	require.Equal(t, codes.InvalidArgument, status.Code(apiError(fmt.Errorf("x: %w", spec.ErrInvalid))))
	require.Equal(t, codes.NotFound, status.Code(apiError(fmt.Errorf("deployment %q: %w", "d", store.ErrNotFound))))
	require.Equal(t, codes.Internal, status.Code(apiError(errors.New("disk on fire"))))
}

func TestKeyringListShowsEveryNode(t *testing.T) {
	tc := newCoord(t)
	tc.mem.set(gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: "n1", GRPC: "a:1", Keys: "k2,k1"},
		gossip.Tag{V: 1, Kind: gossip.KindRouter, ID: "r1", GRPC: "b:1", Keys: "k2"})
	resp, err := tc.api.Keyring(context.Background(), &coordv1.KeyringRequest{Op: "list"})
	require.NoError(t, err)
	require.Equal(t, "2 node(s)", resp.Message)
	require.Equal(t, "n1", resp.Nodes[0].NodeId)
	require.Equal(t, "agent", resp.Nodes[0].Kind)
	require.Equal(t, []string{"k2", "k1"}, resp.Nodes[0].Keys, "primary first")
	require.Equal(t, "router", resp.Nodes[1].Kind)
	_, err = tc.api.Keyring(context.Background(), &coordv1.KeyringRequest{Op: "rotate"})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	_, err = tc.api.Keyring(context.Background(), &coordv1.KeyringRequest{Op: "install", Key: "not base64!"})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
}

func TestFailedMembersAreAskedWhy(t *testing.T) {
	tc := newCoord(t)
	a := startAgent(t, "n1", nil)
	tg := agentTag(a)
	tg.Deployment, tg.Group, tg.Epoch, tg.Engine = "demo", "demo-a", 1, gossip.EngineFailed
	tc.mem.set(tg)
	tc.c.noteFailures(context.Background())
	tc.settle()
	require.Contains(t, strings.Join(tc.c.events.list("demo"), "\n"), "replica demo-a: n1 engine failed: vllm exited (exit status 1)")
	asked := tc.c.failureAsked["n1"]
	tc.c.noteFailures(context.Background())
	require.Equal(t, asked, tc.c.failureAsked["n1"], "not asked again within failureNoteEvery")
	tc.clock = tc.clock.Add(failureNoteEvery)
	tc.c.noteFailures(context.Background())
	require.True(t, tc.c.failureAsked["n1"].After(asked))
}

func TestClusterMetrics(t *testing.T) {
	tc := newCoord(t)
	tc.apply(t, spec2(1))
	tc.mem.set(gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: "n1", GRPC: "a:1", Healthy: true},
		gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: "n2", GRPC: "a:2", Healthy: true, Group: "g"},
		gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: "n3", GRPC: "a:3"})
	require.NoError(t, tc.st.PutGroup(&store.Group{ID: "demo-a", Deployment: "demo", Epoch: 1,
		Members: []store.GroupMember{{NodeID: "n2"}, {NodeID: "n9", Rank: 1}}}))
	out, err := testutil.CollectAndFormat(tc.c.cm, expfmt.TypeTextPlain, "shoal_nodes", "shoal_replicas", "shoal_replica_reforms_total")
	require.NoError(t, err)
	text := string(out)
	for _, want := range []string{`shoal_nodes{state="idle"} 1`, `shoal_nodes{state="assigned"} 1`, `shoal_nodes{state="unhealthy"} 1`,
		`shoal_replicas{deployment="demo",state="degraded"} 1`, `shoal_replica_reforms_total{deployment="demo"} 0`} {
		require.Contains(t, text, want)
	}
}

// fakeHead is a head's Replica API on loopback, reporting m.
type fakeHead struct {
	replicav1.UnimplementedReplicaServer
	m *replicav1.Metrics
}

func (h *fakeHead) Watch(_ *replicav1.SnapshotRequest, s replicav1.Replica_WatchServer) error {
	if err := s.Send(h.m); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// servingHead starts a fake head reporting m for group demo-a (n1 head, n2
// worker), stores the group, gossips the members' tags and waits until the
// coordinator's watcher has the head serving. It returns the head's server
// and the table's next change.
func servingHead(t *testing.T, tc *testCoord, m *replicav1.Metrics) (*grpc.Server, *store.Group, <-chan struct{}) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer()
	replicav1.RegisterReplicaServer(srv, &fakeHead{m: m})
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	tc.apply(t, spec2(1))
	g := &store.Group{ID: "demo-a", Deployment: "demo", Epoch: 1, Created: tc.clock,
		Members: []store.GroupMember{{NodeID: "n1", GRPC: "n1:1"}, {NodeID: "n2", Rank: 1, GRPC: "n2:1"}}}
	require.NoError(t, tc.st.PutGroup(g))
	in := func(id string, head bool) gossip.Tag {
		t := gossip.Tag{V: 1, Kind: gossip.KindAgent, ID: id, GRPC: "127.0.0.9:1", Healthy: true, Group: "demo-a", Epoch: 1, Engine: gossip.EngineReady}
		if head {
			t.HeadTerm, t.Replica = 2, lis.Addr().String()
		}
		return t
	}
	tc.mem.set(in("n1", true), in("n2", false))
	changed := tc.c.table.Changed()
	tc.reconcile(t)                                                                // watches the head the tags name
	for deadline := time.After(10 * time.Second); !tc.c.heads.Serving("demo-a"); { // each report rebuilds the table
		select {
		case <-changed:
			changed = tc.c.table.Changed()
		case <-deadline:
			t.Fatal("the head's report never arrived")
		}
	}
	return srv, g, changed
}

func TestAServingHeadIsReadyEverywhere(t *testing.T) {
	tc := newCoord(t)
	_, g, _ := servingHead(t, tc, &replicav1.Metrics{Deployment: "demo", GroupId: "demo-a", Epoch: 1, Term: 2, NodeId: "n1",
		Serving: true, Endpoint: "10.0.0.1:8000", ServedModelName: "demo", MetricsValid: true, NumRequestsRunning: 3})
	reps, err := tc.api.ListReplicas(context.Background(), &coordv1.ListReplicasRequest{Deployment: "demo"})
	require.NoError(t, err)
	require.Equal(t, "ready", reps.Replicas[0].State)
	require.Equal(t, "n1", reps.Replicas[0].Head)
	require.Equal(t, uint64(2), reps.Replicas[0].Term)
	require.Equal(t, 3.0, reps.Replicas[0].NumRequestsRunning)
	list, err := tc.api.ListDeployments(context.Background(), &coordv1.ListDeploymentsRequest{})
	require.NoError(t, err)
	require.Equal(t, int32(1), list.Deployments[0].ReadyReplicas)
	eps := tc.c.sdEngines()
	require.Len(t, eps, 1)
	require.Equal(t, []string{"10.0.0.1:8000"}, eps[0].Targets, "Prometheus scrapes the head's engine")
	require.Equal(t, "demo-a", eps[0].Labels["replica"])
	snap := tc.c.table.Load()
	routes, known := snap.Endpoints("demo")
	require.True(t, known)
	require.Len(t, routes, 1, "the built-in router routes to it")
	// Drained in the store: the router stops sending to it at once.
	g.DrainingSince = tc.clock
	require.NoError(t, tc.st.PutGroup(g))
	tc.reconcile(t)
	routes, _ = tc.c.table.Load().Endpoints("demo")
	require.Empty(t, routes, "a draining group gets no new requests")
}

// TestAHeadWhoseStreamBrokeIsUnreachable: once a head's Replica stream
// breaks (its agent died), the replica is not shown "ready" from the head's
// last report while the gossip has yet to notice; it is "unreachable".
func TestAHeadWhoseStreamBrokeIsUnreachable(t *testing.T) {
	tc := newCoord(t)
	srv, _, changed := servingHead(t, tc, &replicav1.Metrics{Deployment: "demo", GroupId: "demo-a", Epoch: 1, Term: 2, NodeId: "n1",
		Serving: true, Endpoint: "10.0.0.1:8000", ServedModelName: "demo", MetricsValid: true, Reason: gossip.EngineReady})
	state := func() string {
		reps, err := tc.api.ListReplicas(context.Background(), &coordv1.ListReplicasRequest{Deployment: "demo"})
		require.NoError(t, err)
		return reps.Replicas[0].State
	}
	require.Equal(t, "ready", state())
	srv.Stop() // the head's agent is gone; its tag is still in the gossip
	for deadline := time.After(10 * time.Second); tc.c.heads.Views()["demo-a"].Connected; {
		select {
		case <-changed:
			changed = tc.c.table.Changed()
		case <-deadline:
			t.Fatal("the stream never broke")
		}
	}
	require.Equal(t, "unreachable", state())
}
