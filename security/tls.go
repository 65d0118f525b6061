package security

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// Options say where a daemon or the CLI finds its TLS material: a directory
// holding ca.pem, ROLE.pem and ROLE-key.pem, or explicit files.
type Options struct {
	Dir           string
	CA, Cert, Key string
	Role          Role
	// CertOptional lets a CLI run with only the CA (authenticating by token).
	CertOptional bool
}

func (o Options) files() (ca, cert, key string) {
	ca, cert, key = o.CA, o.Cert, o.Key
	if ca == "" && o.Dir != "" {
		ca = CAFile(o.Dir)
	}
	if cert == "" && o.Dir != "" {
		cert = CertFile(o.Dir, o.Role)
	}
	if key == "" && o.Dir != "" {
		key = KeyFile(o.Dir, o.Role)
	}
	return
}

// TLS is loaded TLS material that can be reloaded while connections use it.
// A nil *TLS means cleartext (--insecure): its methods return insecure
// credentials and allow every call.
type TLS struct {
	opts Options

	mu     sync.RWMutex
	cert   *tls.Certificate // guarded by mu; nil without one
	pool   *x509.CertPool   // guarded by mu
	tokens *Tokens          // guarded by mu
	token  string           // guarded by mu; this client's token, if any
}

// Load reads the material; errors say which file and how to create it.
func Load(o Options) (*TLS, error) {
	t := &TLS{opts: o}
	if err := t.Reload(); err != nil {
		return nil, err
	}
	return t, nil
}

// Reload re-reads the CA and the certificate (SIGHUP): new connections use
// them at once, open ones keep theirs.
func (t *TLS) Reload() error {
	caf, certf, keyf := t.opts.files()
	if caf == "" {
		return errors.New("no CA certificate: give --tls-dir or --tls-ca (create them with `shoal tls ca create`), or --insecure")
	}
	b, err := os.ReadFile(caf)
	if err != nil {
		return fmt.Errorf("CA certificate: %w (create it with `shoal tls ca create`, or run with --insecure on a trusted network)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return fmt.Errorf("CA certificate %s holds no PEM certificate", caf)
	}
	var cert *tls.Certificate
	c, err := tls.LoadX509KeyPair(certf, keyf)
	switch {
	case err == nil:
		leaf, perr := x509.ParseCertificate(c.Certificate[0])
		if perr != nil {
			return perr
		}
		role, _, rerr := RoleOf(leaf)
		if rerr != nil {
			return fmt.Errorf("%s: %w", certf, rerr)
		}
		if role != t.opts.Role {
			return fmt.Errorf("%s is a %s certificate; this process needs a %s one (`shoal tls cert create --%s`)", certf, role, t.opts.Role, t.opts.Role)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return fmt.Errorf("%s is not signed by the CA in %s: %w", certf, caf, err)
		}
		c.Leaf = leaf
		cert = &c
	case t.opts.CertOptional && isNotExist(err):
	default:
		return fmt.Errorf("%s certificate: %w (create it with `shoal tls cert create --%s`)", t.opts.Role, err, t.opts.Role)
	}
	t.mu.Lock()
	t.cert, t.pool = cert, pool
	t.mu.Unlock()
	return nil
}

func isNotExist(err error) bool {
	var pe *os.PathError
	return errors.As(err, &pe) && os.IsNotExist(pe)
}

// SetToken makes this client send a bearer token (CLI without a certificate).
func (t *TLS) SetToken(tok string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.token = tok
	t.mu.Unlock()
}

// SetTokens makes this server accept CLI tokens with these hashes.
func (t *TLS) SetTokens(tk *Tokens) {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.tokens = tk
	t.mu.Unlock()
}

func (t *TLS) snapshot() (*tls.Certificate, *x509.CertPool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.cert, t.pool
}

// ServerCreds: TLS 1.3 with client certificates verified against the CA;
// required unless clientCertOptional (the coordinator API, where a CLI may
// use a token instead).
func (t *TLS) ServerCreds(clientCertOptional bool) credentials.TransportCredentials {
	if t == nil {
		return insecure.NewCredentials()
	}
	auth := tls.RequireAndVerifyClientCert
	if clientCertOptional {
		auth = tls.VerifyClientCertIfGiven
	}
	return credentials.NewTLS(t.serverConfig(auth))
}

// serverConfig is a server's TLS: TLS 1.3, the current certificate, client
// certificates checked as auth says against the current CA; protos are the
// ALPN protocols it speaks (gRPC sets its own).
func (t *TLS) serverConfig(auth tls.ClientAuthType, protos ...string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cert, pool := t.snapshot()
			if cert == nil {
				return nil, errors.New("this server has no certificate")
			}
			return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*cert}, ClientCAs: pool, ClientAuth: auth, NextProtos: protos}, nil
		},
	}
}

// ClientCreds verifies the server against the current CA and its address
// (certificates carry the IPs peers dial) and presents this process's
// certificate.
func (t *TLS) ClientCreds() credentials.TransportCredentials {
	if t == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(&tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below against the reloadable pool
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, pool := t.snapshot()
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, DNSName: cs.ServerName,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			if err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			return nil
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _ := t.snapshot()
			if cert == nil {
				return &tls.Certificate{}, nil // none: the server decides (token or refusal)
			}
			return cert, nil
		},
	})
}

// DialOptions are the options a gRPC client of this process uses.
func (t *TLS) DialOptions() []grpc.DialOption {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(t.ClientCreds())}
	if t != nil {
		t.mu.RLock()
		tok := t.token
		t.mu.RUnlock()
		if tok != "" {
			opts = append(opts, grpc.WithPerRPCCredentials(bearer(tok)))
		}
	}
	return opts
}

// Dial is grpc.NewClient with this process's credentials. addr may be a
// comma-separated list (the servers of a replicated coordinator): the
// connection uses the first that answers and moves on when it goes away.
func (t *TLS) Dial(addr string) (*grpc.ClientConn, error) {
	var addrs []string
	for _, a := range strings.Split(addr, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) <= 1 {
		return grpc.NewClient(strings.TrimSpace(addr), t.DialOptions()...)
	}
	r := manual.NewBuilderWithScheme("shoal-servers")
	var st resolver.State
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return nil, fmt.Errorf("address %q in the list: %w", a, err)
		}
		st.Addresses = append(st.Addresses, resolver.Address{Addr: a, ServerName: host})
	}
	r.InitialState(st)
	return grpc.NewClient(r.Scheme()+":///"+addrs[0], append(t.DialOptions(), grpc.WithResolvers(r))...)
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}
func (bearer) RequireTransportSecurity() bool { return true }
