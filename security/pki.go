package security

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/shoalhq/shoal/internal/secretfile"
)

// Role is what a certificate's holder may do.
type Role string

// Roles.
const (
	RoleCoordinator Role = "coordinator"
	RoleAgent       Role = "agent"
	RoleRouter      Role = "router"
	RoleCLI         Role = "cli"
)

// Roles lists the valid roles.
var Roles = []Role{RoleCoordinator, RoleAgent, RoleRouter, RoleCLI}

// Lifetimes: the CA for 10 years, leaf certificates for 1 year (rotate with
// `shoal tls cert create` and SIGHUP; nothing restarts).
const (
	CALifetime   = 10 * 365 * 24 * time.Hour
	CertLifetime = 365 * 24 * time.Hour
)

// File names inside a TLS directory.
func CAFile(dir string) string           { return filepath.Join(dir, "ca.pem") }
func CAKeyFile(dir string) string        { return filepath.Join(dir, "ca-key.pem") }
func CertFile(dir string, r Role) string { return filepath.Join(dir, string(r)+".pem") }
func KeyFile(dir string, r Role) string  { return filepath.Join(dir, string(r)+"-key.pem") }

// CreateCA writes ca.pem and ca-key.pem into dir; it refuses to overwrite.
func CreateCA(dir, cluster string) error {
	if _, err := os.Stat(CAFile(dir)); err == nil {
		return fmt.Errorf("%s exists; a new CA would invalidate every certificate it signed", CAFile(dir))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "shoal CA " + cluster, Organization: []string{"shoal"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(CALifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeKey(CAKeyFile(dir), key); err != nil {
		return err
	}
	return writePEM(CAFile(dir), "CERTIFICATE", der, 0o644)
}

// CertRequest describes a leaf certificate.
type CertRequest struct {
	Role Role
	Name string   // node id or user name
	IPs  []string // addresses peers dial (agents, coordinator)
	DNS  []string
	// Lifetime defaults to CertLifetime.
	Lifetime time.Duration
}

// CreateCert signs a certificate for req with the CA in caDir and writes
// ROLE.pem and ROLE-key.pem into outDir.
func CreateCert(caDir, outDir string, req CertRequest) error {
	if !validRole(req.Role) {
		return fmt.Errorf("role %q: want one of coordinator, agent, router, cli", req.Role)
	}
	if req.Name == "" || strings.ContainsAny(req.Name, "/ \t\n") || len(req.Name) > 63 {
		return fmt.Errorf("name %q: want 1-63 characters without spaces or '/'", req.Name)
	}
	caCert, caKey, err := loadCA(caDir)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	life := req.Lifetime
	if life == 0 {
		life = CertLifetime
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: req.Name, OrganizationalUnit: []string{string(req.Role)}, Organization: []string{"shoal"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(life),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		URIs:         []*url.URL{{Scheme: "shoal", Host: string(req.Role), Path: "/" + req.Name}},
		DNSNames:     req.DNS,
	}
	for _, s := range req.IPs {
		ip := net.ParseIP(s)
		if ip == nil {
			return fmt.Errorf("--ip %q is not an IP address", s)
		}
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
	}
	if tmpl.NotAfter.After(caCert.NotAfter) {
		tmpl.NotAfter = caCert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	if err := writeKey(KeyFile(outDir, req.Role), key); err != nil {
		return err
	}
	if err := writePEM(CertFile(outDir, req.Role), "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	if outDir != caDir {
		// The CA certificate travels with the leaf, so a host's directory is complete.
		b, err := os.ReadFile(CAFile(caDir))
		if err != nil {
			return err
		}
		return os.WriteFile(CAFile(outDir), b, 0o644)
	}
	return nil
}

func validRole(r Role) bool {
	for _, x := range Roles {
		if x == r {
			return true
		}
	}
	return false
}

// RoleOf reads the role and name a certificate was issued for.
func RoleOf(c *x509.Certificate) (Role, string, error) {
	for _, u := range c.URIs {
		if u.Scheme == "shoal" && validRole(Role(u.Host)) {
			return Role(u.Host), strings.TrimPrefix(u.Path, "/"), nil
		}
	}
	return "", "", errors.New("certificate carries no shoal role (shoal://ROLE/NAME URI)")
}

func loadCA(dir string) (*x509.Certificate, any, error) {
	cb, err := os.ReadFile(CAFile(dir))
	if err != nil {
		return nil, nil, fmt.Errorf("CA certificate: %w (create one with `shoal tls ca create --out %s`)", err, dir)
	}
	kb, err := os.ReadFile(CAKeyFile(dir))
	if err != nil {
		return nil, nil, fmt.Errorf("CA key: %w (certificates are signed where the CA key is)", err)
	}
	cp, _ := pem.Decode(cb)
	kp, _ := pem.Decode(kb)
	if cp == nil || kp == nil {
		return nil, nil, fmt.Errorf("%s: not PEM", dir)
	}
	cert, err := x509.ParseCertificate(cp.Bytes)
	if err != nil {
		return nil, nil, err
	}
	key, err := x509.ParsePKCS8PrivateKey(kp.Bytes)
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// writePEM writes a PEM file; a private key (0600) written by root gets
// group shoal and g+r, so the coordinator and router read theirs
// (internal/secretfile).
func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return secretfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
