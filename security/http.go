package security

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// HTTPServerConfig is the TLS configuration of an HTTPS server of this
// process (the console): its certificate, TLS 1.3, and a client
// certificate verified against the CA when the client gives one (a browser
// with no shoal certificate logs in with a CLI token instead).
func (t *TLS) HTTPServerConfig() *tls.Config {
	return t.serverConfig(tls.VerifyClientCertIfGiven, "http/1.1")
}

// HTTPCaller authenticates an HTTP request as the coordinator API does a
// CLI call: a verified client certificate of the cli role, or a CLI token
// (Authorization: Bearer, or the token the caller logged in with, given as
// cookieToken). A nil *TLS (--insecure) lets everyone in, as the API does.
func (t *TLS) HTTPCaller(r *http.Request, cookieToken string) (Caller, error) {
	if t == nil {
		return Caller{}, nil
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		role, name, err := RoleOf(r.TLS.VerifiedChains[0][0])
		if err != nil {
			return Caller{}, err
		}
		if role != RoleCLI {
			return Caller{Role: role, Name: name}, fmt.Errorf("a %s certificate (%q) may not use the console: use a cli certificate or token", role, name)
		}
		return Caller{Role: role, Name: name}, nil
	}
	tok, bearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !bearer {
		tok = cookieToken
	}
	if tok == "" {
		return Caller{}, errors.New("no client certificate or token: log in with a CLI token (`shoal tls token create NAME`) or present a cli certificate")
	}
	return t.tokenCaller(tok)
}
