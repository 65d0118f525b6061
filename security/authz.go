package security

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/shoalhq/shoal/internal/secretfile"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Policy maps a full gRPC method ("/shoal.agent.v1.Agent/Assign") or a
// service prefix ("/shoal.replica.v1.Replica/") to the roles that may call
// it. Methods it does not name are refused.
type Policy map[string][]Role

func (p Policy) allowed(method string) []Role {
	if r, ok := p[method]; ok {
		return r
	}
	if i := strings.LastIndex(method, "/"); i > 0 {
		return p[method[:i+1]]
	}
	return nil
}

// Policies of shoal's servers.
var (
	AgentPolicy = Policy{
		"/shoal.agent.v1.Agent/Assign":  {RoleCoordinator},
		"/shoal.agent.v1.Agent/Release": {RoleCoordinator},
		"/shoal.agent.v1.Agent/Drain":   {RoleCoordinator},
		"/shoal.agent.v1.Agent/Status":  {RoleCoordinator, RoleAgent},
		"/shoal.agent.v1.Agent/Logs":    {RoleCoordinator},
		// SetAdapters is fenced by the coordinator term, as Assign is.
		"/shoal.agent.v1.Agent/SetAdapters": {RoleCoordinator},
	}
	ReplicaPolicy = Policy{
		"/shoal.replica.v1.Replica/": {RoleCoordinator, RoleRouter},
		"/grpc.health.v1.Health/":    {RoleCoordinator, RoleRouter, RoleAgent, RoleCLI},
	}
	// The writes a follower coordinator forwards to the leader are also
	// allowed to the coordinator role (the follower checked the caller).
	CoordinatorPolicy = Policy{
		"/shoal.coordinator.v1.Coordinator/":                 {RoleCLI},
		"/shoal.coordinator.v1.Coordinator/Demand":           {RoleCLI, RoleRouter, RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/ListDeployments":  {RoleCLI, RoleRouter},
		"/shoal.coordinator.v1.Coordinator/Apply":            {RoleCLI, RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/DeleteDeployment": {RoleCLI, RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/RaftAddPeer":      {RoleCLI, RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/RaftRemovePeer":   {RoleCLI, RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/ReadIndex":        {RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/SnapshotRestore":  {RoleCLI, RoleCoordinator},
		"/shoal.coordinator.v1.Coordinator/ChangeAdapters":   {RoleCLI, RoleCoordinator},
	}
)

// Caller is who made a call.
type Caller struct {
	Role Role
	Name string
}

// Authorize finds the caller of ctx and checks policy for method. A nil
// *TLS (cleartext, --insecure) allows everything.
func (t *TLS) Authorize(ctx context.Context, p Policy, method string) (Caller, error) {
	if t == nil {
		return Caller{}, nil
	}
	c, err := t.caller(ctx)
	if err != nil {
		return c, status.Error(codes.Unauthenticated, err.Error())
	}
	for _, r := range p.allowed(method) {
		if r == c.Role {
			return c, nil
		}
	}
	return c, status.Errorf(codes.PermissionDenied, "%s %q may not call %s", c.Role, c.Name, method)
}

func (t *TLS) caller(ctx context.Context) (Caller, error) {
	pr, ok := peer.FromContext(ctx)
	if ok {
		if ti, ok := pr.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
			role, name, err := RoleOf(ti.State.VerifiedChains[0][0])
			if err != nil {
				return Caller{}, err
			}
			return Caller{Role: role, Name: name}, nil
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		tok, ok := strings.CutPrefix(v, "Bearer ")
		if !ok {
			continue
		}
		return t.tokenCaller(tok)
	}
	return Caller{}, fmt.Errorf("no client certificate or token: give the CLI --tls-dir with a cli certificate, or --token")
}

// tokenCaller is the CLI caller a token names, or why it names none.
func (t *TLS) tokenCaller(tok string) (Caller, error) {
	t.mu.RLock()
	tk := t.tokens
	t.mu.RUnlock()
	if name, ok := tk.Check(tok); ok {
		return Caller{Role: RoleCLI, Name: name}, nil
	}
	return Caller{}, errors.New("token not accepted")
}

// ServerOptions are a gRPC server's credentials and policy checks.
func (t *TLS) ServerOptions(p Policy, clientCertOptional bool) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(t.ServerCreds(clientCertOptional)),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if _, err := t.Authorize(ctx, p, info.FullMethod); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if _, err := t.Authorize(ss.Context(), p, info.FullMethod); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
}

// Tokens are CLI tokens, kept as SHA-256 hashes: a file of "NAME HASH" lines.
type Tokens struct {
	byHash map[string]string
}

// NewToken returns a fresh token and the line to add to a tokens file.
func NewToken(name string) (token, line string, err error) {
	if name == "" || strings.ContainsAny(name, " \t\n") {
		return "", "", fmt.Errorf("token name %q: want a word", name)
	}
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", "", err
	}
	token = "shoal_" + hex.EncodeToString(b)
	return token, name + " " + HashToken(token), nil
}

// HashToken is the at-rest form of a token.
func HashToken(tok string) string {
	s := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(s[:])
}

// LoadTokens reads a tokens file.
func LoadTokens(path string) (*Tokens, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cli tokens: %w", secretfile.Explain(path, err))
	}
	defer f.Close()
	tk := &Tokens{byHash: map[string]string{}}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 || len(f[1]) != 64 {
			return nil, fmt.Errorf("%s:%d: want \"NAME SHA256-HEX\" (from `shoal tls token create NAME`)", path, n)
		}
		if _, err := hex.DecodeString(f[1]); err != nil {
			return nil, fmt.Errorf("%s:%d: hash is not hex", path, n)
		}
		tk.byHash[strings.ToLower(f[1])] = f[0]
	}
	return tk, sc.Err()
}

// Check returns the name of a valid token.
func (tk *Tokens) Check(tok string) (string, bool) {
	if tk == nil || tok == "" {
		return "", false
	}
	name, ok := tk.byHash[HashToken(tok)]
	return name, ok
}
