package security

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestHTTPCallerOverRealTLS serves HTTPS as the console does and calls it as
// a browser would: with a cli certificate, another role's, a token in the
// header or the login cookie, a wrong token, nothing, and a certificate of
// another CA.
func TestHTTPCallerOverRealTLS(t *testing.T) {
	ca, dirs := pki(t)
	srv := load(t, dirs[RoleCoordinator], RoleCoordinator)
	tok, line, err := NewToken("bob")
	require.NoError(t, err)
	f := filepath.Join(t.TempDir(), "tokens")
	require.NoError(t, os.WriteFile(f, []byte(line+"\n"), 0o600))
	tk, err := LoadTokens(f)
	require.NoError(t, err)
	srv.SetTokens(tk)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ck, _ := r.Cookie("c")
		var cookie string
		if ck != nil {
			cookie = ck.Value
		}
		who, err := srv.HTTPCaller(r, cookie)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, string(who.Role)+" "+who.Name)
	})}
	go func() { _ = hs.Serve(tls.NewListener(ln, srv.HTTPServerConfig())) }()
	t.Cleanup(func() { _ = hs.Close() })

	pool := x509.NewCertPool()
	pem, err := os.ReadFile(CAFile(ca))
	require.NoError(t, err)
	pool.AppendCertsFromPEM(pem)
	client := func(certDir string, r Role) *http.Client {
		cfg := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
		if certDir != "" {
			c, err := tls.LoadX509KeyPair(CertFile(certDir, r), KeyFile(certDir, r))
			require.NoError(t, err)
			// Sent whatever CAs the server names (Go's client would leave
			// out a certificate of a CA the server does not name).
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	}
	call := func(c *http.Client, hdr ...string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, "https://"+ln.Addr().String()+"/", nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := call(client(dirs[RoleCLI], RoleCLI))
	require.Equal(t, 200, code, body)
	require.Equal(t, "cli cli-1", body)
	code, body = call(client(dirs[RoleAgent], RoleAgent))
	require.Equal(t, 401, code)
	require.Contains(t, body, "may not use the console")
	code, body = call(client("", ""), "Authorization", "Bearer "+tok)
	require.Equal(t, 200, code, body)
	require.Equal(t, "cli bob", body)
	code, body = call(client("", ""), "Cookie", "c="+tok)
	require.Equal(t, 200, code, body)
	code, body = call(client("", ""), "Authorization", "Bearer shoal_wrong", "Cookie", "c="+tok)
	require.Equal(t, 401, code, "a header token is checked, not passed over for the cookie")
	require.Contains(t, body, "token not accepted")
	code, body = call(client("", ""))
	require.Equal(t, 401, code)
	require.Contains(t, body, "log in with a CLI token")

	other := t.TempDir()
	require.NoError(t, CreateCA(other, "other"))
	od := filepath.Join(t.TempDir(), "cli")
	require.NoError(t, CreateCert(other, od, CertRequest{Role: RoleCLI, Name: "mallory"}))
	code, body = call(client(od, RoleCLI))
	require.Equal(t, 0, code, "a certificate of another CA fails the handshake: %s", body)

	var none *TLS
	who, err := none.HTTPCaller(&http.Request{Header: http.Header{}}, "")
	require.NoError(t, err, "--insecure: open, as the API is")
	require.Equal(t, Caller{}, who)
}
