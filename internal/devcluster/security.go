package devcluster

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/security"
)

// A dev cluster is secured like a real one, with throw-away material made
// at start: a CA, a certificate per process (agents carry their IP), a CLI
// certificate, and one gossip key copied to every node's own key file.

func (c *Cluster) tlsDir(name string) string { return filepath.Join(c.cfg.Dir, "tls", name) }

func (c *Cluster) setupSecurity() error {
	if c.cfg.Insecure {
		return nil
	}
	ca := c.tlsDir("ca")
	if _, err := os.Stat(security.CAFile(ca)); err != nil {
		if err := security.CreateCA(ca, "shoal-dev"); err != nil {
			return err
		}
		k, err := gossip.GenerateKey()
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(ca, "gossip.key"), []byte(k+"\n"), 0o600); err != nil {
			return err
		}
	}
	if _, err := os.Stat(c.tokensFile()); err != nil {
		tok, line, err := security.NewToken("console")
		if err != nil {
			return err
		}
		if err := os.MkdirAll(c.tlsDir("cli"), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(c.tlsDir("cli"), "token"), []byte(tok+"\n"), 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(c.tokensFile(), []byte(line+"\n"), 0o600); err != nil {
			return err
		}
	}
	for name, req := range map[string]security.CertRequest{
		"coordinator": {Role: security.RoleCoordinator, Name: "coordinator", IPs: []string{c.cfg.CoordIP}},
		"cli":         {Role: security.RoleCLI, Name: "dev"},
		"router":      {Role: security.RoleRouter, Name: "router", IPs: []string{"127.0.0.1"}},
	} {
		if err := security.CreateCert(ca, c.tlsDir(name), req); err != nil {
			return err
		}
	}
	return nil
}

// securityArgs are a process's flags: its TLS directory and its own copy of
// the gossip key file (keyring changes rewrite it).
func (c *Cluster) securityArgs(name string, req *security.CertRequest) ([]string, error) {
	if c.cfg.Insecure {
		return []string{"--insecure"}, nil
	}
	if req != nil {
		if _, err := os.Stat(security.CertFile(c.tlsDir(name), req.Role)); err != nil {
			if err := security.CreateCert(c.tlsDir("ca"), c.tlsDir(name), *req); err != nil {
				return nil, err
			}
		}
	}
	kf := filepath.Join(c.tlsDir(name), "gossip.key")
	if _, err := os.Stat(kf); err != nil {
		b, err := os.ReadFile(filepath.Join(c.tlsDir("ca"), "gossip.key"))
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(kf, b, 0o600); err != nil {
			return nil, err
		}
	}
	return []string{"--tls-dir", c.tlsDir(name), "--gossip-key-file", kf}, nil
}

// tokensFile is the coordinator's --cli-tokens-file: the hash of one CLI
// token, the console's login.
func (c *Cluster) tokensFile() string { return filepath.Join(c.tlsDir("ca"), "cli-tokens") }

// ConsoleToken is the CLI token the console takes ("" when insecure).
func (c *Cluster) ConsoleToken() string {
	if c.cfg.Insecure {
		return ""
	}
	b, err := os.ReadFile(filepath.Join(c.tlsDir("cli"), "token"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// consoleArgs are the coordinator's console flags.
func (c *Cluster) consoleArgs() []string {
	if c.cfg.ConsoleAddr == "" {
		return nil
	}
	args := []string{"--console", c.cfg.ConsoleAddr}
	if !c.cfg.ConsoleHTTPS {
		args = append(args, "--console-cleartext")
	}
	if !c.cfg.Insecure {
		args = append(args, "--cli-tokens-file", c.tokensFile())
	}
	return args
}

// ClientEnv is the environment the CLI needs to reach this cluster.
func (c *Cluster) ClientEnv() []string {
	if c.cfg.Insecure {
		return []string{"SHOAL_INSECURE=1", "SHOAL_COORDINATOR=" + c.apiList()}
	}
	return []string{"SHOAL_TLS_DIR=" + c.tlsDir("cli"), "SHOAL_COORDINATOR=" + c.apiList()}
}

// ClientTLSDir holds the CLI's certificate ("" when insecure).
func (c *Cluster) ClientTLSDir() string {
	if c.cfg.Insecure {
		return ""
	}
	return c.tlsDir("cli")
}

// RouterArgs are the security flags of a standalone router named name.
func (c *Cluster) RouterArgs(name string) ([]string, error) {
	return c.securityArgs(name, &security.CertRequest{Role: security.RoleRouter, Name: name, IPs: []string{"127.0.0.1"}})
}

// TLSDir is where process name keeps its certificate (tests use it to act
// as that process).
func (c *Cluster) TLSDir(name string) string { return c.tlsDir(name) }

// agentCert is an agent's certificate request: it carries the IP peers dial
// (CreateCert rejects one that is not an IP).
func agentCert(id, ip string) *security.CertRequest {
	return &security.CertRequest{Role: security.RoleAgent, Name: id, IPs: []string{ip}}
}
