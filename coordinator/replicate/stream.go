package replicate

import (
	"crypto/tls"
	"log/slog"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// tlsStream is Raft's transport over mutual TLS: both ends present a
// coordinator certificate of the cluster's CA (security.PeerTLS). A peer
// that fails the handshake (another cluster's CA, another role) is logged
// with the reason and never reaches Raft.
type tlsStream struct {
	net.Listener
	server, client *tls.Config
	log            *slog.Logger
}

// handshakeTimeout bounds a peer's TLS handshake.
const handshakeTimeout = 10 * time.Second

func (s *tlsStream) Accept() (net.Conn, error) {
	for {
		c, err := s.Listener.Accept()
		if err != nil {
			return nil, err
		}
		tc := tls.Server(c, s.server)
		_ = tc.SetDeadline(time.Now().Add(handshakeTimeout))
		if err := tc.Handshake(); err != nil {
			s.log.Warn("raft: refused a peer", "from", c.RemoteAddr().String(), "err", err)
			c.Close()
			continue
		}
		_ = tc.SetDeadline(time.Time{})
		return tc, nil
	}
}

func (s *tlsStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	cfg := s.client.Clone()
	if host, _, err := net.SplitHostPort(string(addr)); err == nil {
		cfg.ServerName = host
	}
	return tls.DialWithDialer(d, "tcp", string(addr), cfg)
}
