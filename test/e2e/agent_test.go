package e2e

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	"github.com/shoalhq/shoal/security"
	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// TestAgentRestartResumesAssignment: with no spare node, an agent that restarts
// comes back with the assignment it persisted (same group, same epoch), the
// group elects again and serves; the coordinator never re-forms it.
func TestAgentRestartResumesAssignment(t *testing.T) {
	e := startCluster(t, 8, 2)
	before := e.oneReplica()

	// Agent API validation, over real gRPC (mutual TLS) against a running
	// agent, acting as the coordinator: only its certificate may assign.
	coordTLS, err := security.Load(security.Options{Dir: e.c.TLSDir("coordinator"), Role: security.RoleCoordinator})
	require.NoError(t, err)
	conn, err := coordTLS.Dial(e.c.AgentIP(0) + ":7947")
	require.NoError(t, err)
	defer conn.Close()
	ac := agentv1.NewAgentClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := ac.Status(ctx, &agentv1.StatusRequest{})
	require.NoError(t, err)
	require.Len(t, st.Gpus, 8)
	require.Equal(t, before.GroupID, st.Assignment.GroupId)
	d, err := spec.Parse([]byte(spec2x2))
	require.NoError(t, err)
	good := func() *agentv1.Assignment {
		return &agentv1.Assignment{Deployment: "demo", GroupId: "other-1", Epoch: 1, Rank: 0, SpecJson: d.JSON(),
			Members: []*agentv1.Member{{NodeId: "node-1", Rank: 0, GrpcAddr: "127.0.8.2:7947"}, {NodeId: "x", Rank: 1, GrpcAddr: "127.0.8.9:7947"}}}
	}
	for name, c := range map[string]struct {
		mod  func(*agentv1.Assignment)
		code codes.Code
		msg  string
	}{
		"busy":          {func(a *agentv1.Assignment) {}, codes.FailedPrecondition, "release it first"},
		"not a member":  {func(a *agentv1.Assignment) { a.Members[0].NodeId = "y" }, codes.InvalidArgument, "not a member"},
		"no epoch":      {func(a *agentv1.Assignment) { a.Epoch = 0 }, codes.InvalidArgument, "epoch"},
		"bad spec":      {func(a *agentv1.Assignment) { a.SpecJson = []byte("{") }, codes.InvalidArgument, "invalid deployment spec"},
		"dup ranks":     {func(a *agentv1.Assignment) { a.Members[1].Rank = 0 }, codes.InvalidArgument, "unique"},
		"wrong members": {func(a *agentv1.Assignment) { a.Members = a.Members[:1] }, codes.InvalidArgument, "1 members for a 2-node replica"},
	} {
		a := good()
		c.mod(a)
		_, err := ac.Assign(ctx, &agentv1.AssignRequest{Assignment: a})
		require.Equal(t, c.code, status.Code(err), "%s: %v", name, err)
		require.Contains(t, err.Error(), c.msg, name)
	}

	// Another agent's certificate cannot assign work; no certificate cannot connect.
	peerTLS, err := security.Load(security.Options{Dir: e.c.TLSDir("node-2"), Role: security.RoleAgent})
	require.NoError(t, err)
	pconn, err := peerTLS.Dial(e.c.AgentIP(0) + ":7947")
	require.NoError(t, err)
	defer pconn.Close()
	_, err = agentv1.NewAgentClient(pconn).Assign(ctx, &agentv1.AssignRequest{Assignment: good()})
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	_, err = agentv1.NewAgentClient(pconn).Status(ctx, &agentv1.StatusRequest{})
	require.NoError(t, err, "agents may read each other's status")
	clear, err := grpc.NewClient(e.c.AgentIP(0)+":7947", grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer clear.Close()
	_, err = agentv1.NewAgentClient(clear).Status(ctx, &agentv1.StatusRequest{})
	require.Equal(t, codes.Unavailable, status.Code(err), "cleartext is refused: %v", err)
	_, err = ac.Release(ctx, &agentv1.ReleaseRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	_, err = ac.Release(ctx, &agentv1.ReleaseRequest{GroupId: "not-mine"})
	require.NoError(t, err, "releasing a group the node is not in is a no-op")

	// Restart the head's agent: it stops its engines, leaves, comes back.
	var headIdx int
	for i := 0; i < 2; i++ {
		for _, n := range e.nodes() {
			if n.NodeID == before.Head && n.Address == e.c.AgentIP(i) {
				headIdx = i
			}
		}
	}
	require.NoError(t, e.c.Restart(headIdx))
	require.Eventually(t, func() bool {
		rs := e.replicas()
		return len(rs) == 1 && rs[0].State == "ready" && rs[0].GroupID == before.GroupID
	}, 60*time.Second, 200*time.Millisecond)
	after := e.replicas()[0]
	require.Equal(t, before.Epoch, after.Epoch, "the group resumed; it was not re-formed")
	require.NotEqual(t, "", after.Head)
	r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"hi","max_tokens":2}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode)
	out, err := e.shoal("describe", "deployment", "demo")
	require.NoError(t, err)
	require.NotContains(t, out, "re-formed")
}
