package replicate

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/security"
)

func newCA(t *testing.T, cluster string) string {
	t.Helper()
	ca := t.TempDir()
	if err := security.CreateCA(ca, cluster); err != nil {
		t.Fatal(err)
	}
	return ca
}

// material is a certificate of role for name, signed by ca, loaded.
func material(t *testing.T, ca string, role security.Role, name string) *security.TLS {
	t.Helper()
	dir := t.TempDir()
	if err := security.CreateCert(ca, dir, security.CertRequest{Role: role, Name: name, IPs: []string{"127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(security.CAFile(ca))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(security.CAFile(dir), b, 0o600); err != nil {
		t.Fatal(err)
	}
	tl, err := security.Load(security.Options{Dir: dir, Role: role})
	if err != nil {
		t.Fatal(err)
	}
	return tl
}

// lockedBuf is a log sink the test reads while servers write to it.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRaftOverMutualTLS: servers with coordinator certificates of one CA
// form a group; a server with another CA's certificate, or an agent's
// certificate of the right CA, is refused in the handshake with the reason
// logged, and never becomes a member that counts.
func TestRaftOverMutualTLS(t *testing.T) {
	ca := newCA(t, "prod")
	own := []*security.TLS{material(t, ca, security.RoleCoordinator, "c1"), material(t, ca, security.RoleCoordinator, "c2")}
	foreign := material(t, newCA(t, "other"), security.RoleCoordinator, "c3")
	addrs := loopbackAddrs(t, 3)
	servers := []Server{{"c1", addrs[0]}, {"c2", addrs[1]}, {"c3", addrs[2]}}
	logs := &lockedBuf{}
	var nodes []*Node
	open := func(i int, tl *security.TLS) {
		srv, cl, err := tl.PeerTLS(security.RoleCoordinator)
		if err != nil {
			t.Fatal(err)
		}
		nd, err := Open(Config{ID: servers[i].ID, Addr: servers[i].Addr, Dir: t.TempDir(), Servers: servers, ServerTLS: srv, ClientTLS: cl,
			Logger: slog.New(slog.NewTextHandler(logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, nd)
	}
	defer func() {
		for _, n := range nodes {
			n.Close()
		}
	}()
	open(0, own[0])
	open(1, own[1])
	open(2, foreign) // the third server is of another cluster
	c := &cluster{t: t, nodes: nodes}
	l := c.leader()
	if l == 2 {
		t.Fatal("the foreign server leads")
	}
	if _, err := nodes[l].PutDeployment(deployment("a"), ""); err != nil {
		t.Fatalf("two of three servers of the cluster commit: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "not of this cluster's CA") {
		if time.Now().After(deadline) {
			t.Fatalf("no refusal logged:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := nodes[2].Deployment("a"); err == nil {
		t.Fatal("the foreign server received the cluster's records")
	}

	// The right CA but an agent's certificate: refused for its role.
	srv, _, err := own[0].PeerTLS(security.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	_, agentClient, err := material(t, ca, security.RoleAgent, "n1").PeerTLS(security.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	errs := make(chan error, 1)
	go func() {
		cfg := agentClient.Clone()
		cfg.ServerName = "127.0.0.1"
		c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err == nil {
			_, err = c.Read(make([]byte, 1)) // TLS 1.3: the server's verdict comes after the client's Finished
			c.Close()
		}
		errs <- err
	}()
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	err = tls.Server(conn, srv).Handshake()
	conn.Close()
	if err == nil || !strings.Contains(err.Error(), "agent certificate; only coordinator certificates may join") {
		t.Fatalf("an agent certificate in the Raft handshake: %v", err)
	}
	if err := <-errs; err == nil {
		t.Fatal("the agent's side saw no refusal")
	}
}
