package security

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// PeerTLS is mutual TLS for a link between two servers of one role (the
// coordinators' Raft traffic): each side presents its certificate, and
// each checks the other's against the cluster's CA and for that role. A
// peer of another cluster (another CA) or of another role is refused in the
// handshake, with an error that says which.
func (t *TLS) PeerTLS(role Role) (server, client *tls.Config, err error) {
	if t == nil {
		return nil, nil, errors.New("peer TLS needs certificates (this process runs --insecure)")
	}
	verify := func(certs []*x509.Certificate, usage x509.ExtKeyUsage, serverName string) error {
		_, pool := t.snapshot()
		if len(certs) == 0 {
			return errors.New("the peer sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		opts := x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}, DNSName: serverName}
		if _, err := certs[0].Verify(opts); err != nil {
			return fmt.Errorf("the peer's certificate is not of this cluster's CA (a server of another cluster?): %w", err)
		}
		r, name, err := RoleOf(certs[0])
		if err != nil {
			return err
		}
		if r != role {
			return fmt.Errorf("the peer %q has a %s certificate; only %s certificates may join", name, r, role)
		}
		return nil
	}
	server = &tls.Config{MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cert, _ := t.snapshot()
			if cert == nil {
				return nil, errors.New("this server has no certificate")
			}
			return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*cert}, ClientAuth: tls.RequireAnyClientCert,
				VerifyConnection: func(cs tls.ConnectionState) error {
					return verify(cs.PeerCertificates, x509.ExtKeyUsageClientAuth, "")
				}}, nil
		}}
	client = &tls.Config{MinVersion: tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below, against the reloadable pool
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verify(cs.PeerCertificates, x509.ExtKeyUsageServerAuth, cs.ServerName)
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _ := t.snapshot()
			if cert == nil {
				return nil, errors.New("this server has no certificate")
			}
			return cert, nil
		}}
	return server, client, nil
}
