package security

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type fakeAgent struct {
	agentv1.UnimplementedAgentServer
}

func (fakeAgent) Assign(context.Context, *agentv1.AssignRequest) (*agentv1.AssignResponse, error) {
	return &agentv1.AssignResponse{}, nil
}
func (fakeAgent) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	return &agentv1.StatusResponse{NodeId: "n1"}, nil
}

type fakeCoord struct {
	coordv1.UnimplementedCoordinatorServer
}

func (fakeCoord) ListNodes(context.Context, *coordv1.ListNodesRequest) (*coordv1.ListNodesResponse, error) {
	return &coordv1.ListNodesResponse{}, nil
}

func pki(t *testing.T) (ca string, dirs map[Role]string) {
	ca = t.TempDir()
	require.NoError(t, CreateCA(ca, "test"))
	require.ErrorContains(t, CreateCA(ca, "test"), "exists")
	dirs = map[Role]string{}
	for _, r := range Roles {
		d := filepath.Join(t.TempDir(), string(r))
		require.NoError(t, CreateCert(ca, d, CertRequest{Role: r, Name: string(r) + "-1", IPs: []string{"127.0.0.1"}}))
		dirs[r] = d
	}
	return ca, dirs
}

func serve(t *testing.T, opts []grpc.ServerOption, reg func(*grpc.Server)) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := grpc.NewServer(opts...)
	reg(s)
	go s.Serve(l)
	t.Cleanup(s.Stop)
	return l.Addr().String()
}

func load(t *testing.T, dir string, r Role) *TLS {
	tl, err := Load(Options{Dir: dir, Role: r, CertOptional: r == RoleCLI})
	require.NoError(t, err)
	return tl
}

func writePEMText(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

func code(err error) codes.Code { return status.Code(err) }

func TestMutualTLSAndRoles(t *testing.T) {
	_, dirs := pki(t)
	srvTLS := load(t, dirs[RoleAgent], RoleAgent)
	addr := serve(t, srvTLS.ServerOptions(AgentPolicy, false), func(s *grpc.Server) { agentv1.RegisterAgentServer(s, fakeAgent{}) })
	call := func(tl *TLS) (assign, stat error) {
		conn, err := tl.Dial(addr)
		require.NoError(t, err)
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		c := agentv1.NewAgentClient(conn)
		_, assign = c.Assign(ctx, &agentv1.AssignRequest{})
		_, stat = c.Status(ctx, &agentv1.StatusRequest{})
		return
	}
	a, s := call(load(t, dirs[RoleCoordinator], RoleCoordinator))
	require.NoError(t, a, "the coordinator may assign")
	require.NoError(t, s)

	a, s = call(load(t, dirs[RoleAgent], RoleAgent))
	require.Equal(t, codes.PermissionDenied, code(a), "an agent may not assign another agent: %v", a)
	require.Contains(t, a.Error(), `agent "agent-1" may not call /shoal.agent.v1.Agent/Assign`)
	require.NoError(t, s, "agents read each other's status")

	a, _ = call(load(t, dirs[RoleRouter], RoleRouter))
	require.Equal(t, codes.PermissionDenied, code(a))

	// No certificate at all, or cleartext: refused at the handshake.
	noCert, err := Load(Options{CA: CAFile(dirs[RoleCLI]), Role: RoleCLI, CertOptional: true})
	require.NoError(t, err)
	a, _ = call(noCert)
	require.Equal(t, codes.Unavailable, code(a), "%v", a)
	a, _ = call(nil)
	require.Equal(t, codes.Unavailable, code(a), "%v", a)

	// A certificate from another CA: refused, both ways.
	_, other := pki(t)
	a, _ = call(load(t, other[RoleCoordinator], RoleCoordinator))
	require.Equal(t, codes.Unavailable, code(a), "%v", a)
}

func TestCLITokensOnTheCoordinatorAPI(t *testing.T) {
	_, dirs := pki(t)
	srv := load(t, dirs[RoleCoordinator], RoleCoordinator)
	tok, line, err := NewToken("alice")
	require.NoError(t, err)
	f := filepath.Join(t.TempDir(), "tokens")
	require.NoError(t, writePEMText(f, "# cli tokens\n"+line+"\n"))
	tk, err := LoadTokens(f)
	require.NoError(t, err)
	srv.SetTokens(tk)
	addr := serve(t, srv.ServerOptions(CoordinatorPolicy, true), func(s *grpc.Server) { coordv1.RegisterCoordinatorServer(s, fakeCoord{}) })
	call := func(tl *TLS) error {
		conn, err := tl.Dial(addr)
		require.NoError(t, err)
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err = coordv1.NewCoordinatorClient(conn).ListNodes(ctx, &coordv1.ListNodesRequest{})
		return err
	}
	require.NoError(t, call(load(t, dirs[RoleCLI], RoleCLI)), "a cli certificate")
	withTok, err := Load(Options{CA: CAFile(dirs[RoleCLI]), Role: RoleCLI, CertOptional: true})
	require.NoError(t, err)
	withTok.SetToken(tok)
	require.NoError(t, call(withTok), "a token instead of a certificate")
	bad, _ := Load(Options{CA: CAFile(dirs[RoleCLI]), Role: RoleCLI, CertOptional: true})
	bad.SetToken("shoal_wrong")
	require.Equal(t, codes.Unauthenticated, code(call(bad)))
	none, _ := Load(Options{CA: CAFile(dirs[RoleCLI]), Role: RoleCLI, CertOptional: true})
	err = call(none)
	require.Equal(t, codes.Unauthenticated, code(err))
	require.Contains(t, err.Error(), "--token")
	require.Equal(t, codes.PermissionDenied, code(call(load(t, dirs[RoleAgent], RoleAgent))), "agents do not drive the coordinator")
}

func TestLoadErrorsAndReload(t *testing.T) {
	ca, dirs := pki(t)
	_, err := Load(Options{Dir: dirs[RoleAgent], Role: RoleCoordinator})
	require.ErrorContains(t, err, "shoal tls cert create --coordinator")
	_, err = Load(Options{Dir: t.TempDir(), Role: RoleAgent})
	require.ErrorContains(t, err, "shoal tls ca create")
	// A certificate with the role of another CA's chain is refused.
	_, other := pki(t)
	_, err = Load(Options{CA: CAFile(dirs[RoleAgent]), Cert: CertFile(other[RoleAgent], RoleAgent), Key: KeyFile(other[RoleAgent], RoleAgent), Role: RoleAgent})
	require.ErrorContains(t, err, "not signed by the CA")

	tl := load(t, dirs[RoleAgent], RoleAgent)
	c1, _ := tl.snapshot()
	require.NoError(t, CreateCert(ca, dirs[RoleAgent], CertRequest{Role: RoleAgent, Name: "agent-1", IPs: []string{"127.0.0.1"}}))
	require.NoError(t, tl.Reload())
	c2, _ := tl.snapshot()
	require.NotEqual(t, c1.Leaf.SerialNumber, c2.Leaf.SerialNumber, "SIGHUP picks up a renewed certificate")
	require.ErrorContains(t, CreateCert(ca, t.TempDir(), CertRequest{Role: "admin", Name: "x"}), "role")
	require.ErrorContains(t, CreateCert(ca, t.TempDir(), CertRequest{Role: RoleAgent, Name: "a b"}), "name")
	require.ErrorContains(t, CreateCert(ca, t.TempDir(), CertRequest{Role: RoleAgent, Name: "a", IPs: []string{"nope"}}), "not an IP")
}

func FuzzLoadTokens(f *testing.F) {
	f.Add([]byte("alice " + HashToken("x") + "\n# c\n"))
	f.Add([]byte("bob zz\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "tokens")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Skip()
		}
		tk, err := LoadTokens(p)
		if err == nil {
			if _, ok := tk.Check(""); ok {
				t.Fatal("the empty token was accepted")
			}
		}
	})
}

// Every method of every shoal service has a policy: a method added without
// one would be refused to everybody (the coordinator's Drain once was).
func TestEveryMethodHasAPolicy(t *testing.T) {
	for _, c := range []struct {
		desc   grpc.ServiceDesc
		policy Policy
	}{{agentv1.Agent_ServiceDesc, AgentPolicy}, {replicav1.Replica_ServiceDesc, ReplicaPolicy}, {coordv1.Coordinator_ServiceDesc, CoordinatorPolicy}} {
		var names []string
		for _, m := range c.desc.Methods {
			names = append(names, m.MethodName)
		}
		for _, s := range c.desc.Streams {
			names = append(names, s.StreamName)
		}
		for _, n := range names {
			full := "/" + c.desc.ServiceName + "/" + n
			require.NotEmpty(t, c.policy.allowed(full), "%s has no policy", full)
		}
	}
}
