package h1

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The differential fuzz targets: the hand-written HTTP/1.1 code is held to
// net/http on every input. The fast path may hand over (or the client
// refuse) what net/http takes; what it takes, net/http must take exactly so.

var (
	testPaths = map[string]string{"/v1/completions": "/v1/completions", "/v1/chat/completions": "/v1/chat/completions", "/v1/embeddings": "/v1/embeddings"}
	testKeep  = []keepName{{"authorization", "Authorization"}, {"content-type", "Content-Type"}, {"x-request-id", "X-Request-Id"}}
)

// requestProbes are request heads a security tester sends (smuggling,
// desync, header injection): the corpus of FuzzServerMatchesNetHTTP.
var requestProbes = []string{
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\"}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
	"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2 \r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length:\t2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: a b\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\n Content-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A: b\r\n folded\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A\x00: b\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A: b\rContent-Length: 9\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x01k\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
	"POST http://x/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
	"POST  /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
	"post /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
	"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{}",
	"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
	"POST /v1/embeddings HTTP/1.1\r\nHost: [::1]:80\r\nX-Request-Id: a\r\nX-Request-Id: b\r\nContent-Length: 2\r\n\r\n{}",
}

// oneConnListener serves one connection, then blocks until closed.
type oneConnListener struct {
	c    chan net.Conn
	done chan struct{}
	once sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *oneConnListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *oneConnListener) Addr() net.Addr { return &net.TCPAddr{} }

// bytesConn reads fixed bytes then EOF; writes are dropped; Close is signalled.
type bytesConn struct {
	r      *bytes.Reader
	closed chan struct{}
	once   sync.Once
	mu     sync.Mutex
}

func (c *bytesConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.r.Read(p)
}
func (c *bytesConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *bytesConn) Close() error                     { c.once.Do(func() { close(c.closed) }); return nil }
func (c *bytesConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *bytesConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *bytesConn) SetDeadline(time.Time) error      { return nil }
func (c *bytesConn) SetReadDeadline(time.Time) error  { return nil }
func (c *bytesConn) SetWriteDeadline(time.Time) error { return nil }

// seenRequest is what a handler saw of a request.
type seenRequest struct {
	method, uri, path, host, proto string
	length                         int64
	close                          bool
	header                         http.Header
	body                           []byte
	bodyErr                        error
}

// netHTTPFirstRequest serves data to a real http.Server and returns the
// first request its handler saw (nil: it answered none, an error page).
func netHTTPFirstRequest(data []byte) *seenRequest {
	var first *seenRequest
	var mu sync.Mutex
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first = &seenRequest{method: r.Method, uri: r.RequestURI, path: r.URL.Path, host: r.Host, proto: r.Proto,
				length: r.ContentLength, close: r.Close, header: r.Header.Clone(), body: b, bodyErr: err}
		}
	}), ErrorLog: log.New(io.Discard, "", 0)} // its 400s are expected here
	c := &bytesConn{r: bytes.NewReader(data), closed: make(chan struct{})}
	l := &oneConnListener{c: make(chan net.Conn, 1), done: make(chan struct{})}
	l.c <- c
	go func() { _ = srv.Serve(l) }()
	<-c.closed
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = srv.Shutdown(ctx)
	mu.Lock()
	defer mu.Unlock()
	return first
}

// FuzzServerMatchesNetHTTP: a request the fast path takes, net/http's
// server takes too, with the same method, target, Host, headers kept,
// Content-Length, Connection: close and body bytes (the boundary of the
// next request). What the fast path does not take goes to net/http anyway.
func FuzzServerMatchesNetHTTP(f *testing.F) {
	for _, p := range requestProbes {
		f.Add([]byte(p))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkServerMatches(t, data)
	})
}

func checkServerMatches(t *testing.T, data []byte) (taken bool) {
	t.Helper()
	br := bufio.NewReaderSize(bytes.NewReader(data), MaxHead)
	fr, n, v := parseHead(br, testPaths, testKeep, nil)
	if v != headOK {
		return false
	}
	if n <= 0 || n > len(data) || fr.Length < 0 || !bytes.HasSuffix(data[:n], []byte("\r\n\r\n")) {
		t.Fatalf("accepted a bad head: n=%d length=%d", n, fr.Length)
	}
	got := netHTTPFirstRequest(data)
	if got == nil {
		t.Fatalf("the fast path took a request net/http refuses:\n%q", data)
	}
	if got.method != http.MethodPost || got.uri != fr.Path || got.path != fr.Path || got.proto != "HTTP/1.1" ||
		got.host != fr.Host || got.length != fr.Length || got.close != fr.Close {
		t.Fatalf("fast path %+v, net/http %+v for\n%q", fr, got, data)
	}
	for _, k := range testKeep {
		if !slices.Equal(fr.Header[k.canonical], got.header[k.canonical]) {
			t.Fatalf("header %s: fast path %q, net/http %q for\n%q", k.canonical, fr.Header[k.canonical], got.header[k.canonical], data)
		}
	}
	end := int64(n) + fr.Length
	if end <= int64(len(data)) {
		if got.bodyErr != nil || !bytes.Equal(got.body, data[n:end]) {
			t.Fatalf("body: fast path %q, net/http %q (%v)", data[n:end], got.body, got.bodyErr)
		}
	} else if got.bodyErr == nil {
		t.Fatalf("net/http read a whole body of %d bytes from %d", fr.Length, len(data)-n)
	}
	return true
}

// TestServerProbes: every probe runs through the differential check, and
// the ones net/http must answer itself are handed over.
func TestServerProbes(t *testing.T) {
	taken := 0
	for _, p := range requestProbes {
		if checkServerMatches(t, []byte(p)) {
			taken++
		}
	}
	require := func(cond bool, msg string) {
		if !cond {
			t.Fatal(msg)
		}
	}
	require(taken >= 5, "the fast path took too few of the well-formed probes")
	for _, p := range []string{
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 2\r\n\r\n{}",
		"POST /v1/completions HTTP/1.1\r\nHost: a b\r\nContent-Length: 2\r\n\r\n{}",
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A\x00: b\r\nContent-Length: 2\r\n\r\n{}",
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	} {
		_, _, v := parseHead(bufio.NewReaderSize(strings.NewReader(p), MaxHead), testPaths, testKeep, nil)
		require(v == headHandOff, "not handed over: "+p)
	}
}

// responseProbes are engine answers that break the rules: the corpus of
// FuzzClientMatchesNetHTTP.
var responseProbes = []string{
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
	"HTTP/1.1 204 No Content\r\n\r\nbody",
	"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\nbody",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nok",
	"HTTP/1.1 200 OK\r\nX-A\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nX-A\rContent-Length: 0\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nX-A\x00: b\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nX-A : b\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nX-A: b\x01c\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
	"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 x\r\nContent-Length: 1\r\n\r\n!",
	"HTTP/1.0 200 OK\r\n\r\nuntil close",
	"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
	"HTTP/1.1 200\r\nConnection: close, keep-alive\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: a\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
}

// clientRead runs the client's parser over data: status, headers, body, or
// the first error.
func clientRead(data []byte) (*Response, []byte, error) {
	u := NewClient()
	addr := "127.0.0.1:1"
	c := &conn{Conn: &scriptConn{r: bytes.NewReader(data)}, addr: addr, last: time.Now()}
	c.br = bufio.NewReaderSize(c.Conn, 16<<10)
	u.idle[addr] = []*conn{c}
	r, err := u.try(context.Background(), addr, "POST", "/x", nil, []byte("{}"), time.Second)
	if err != nil {
		return nil, nil, err
	}
	b, err := io.ReadAll(r)
	_ = r.Close()
	u.CloseIdle()
	return r, b, err
}

var hopByHop = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// FuzzClientMatchesNetHTTP: an answer the client reads whole, net/http's
// ReadResponse reads with the same status, the same end-to-end headers
// (Content-Length only where net/http keeps it) and the same body; a body
// the client cuts off (ErrTruncated) net/http cannot read whole either.
func FuzzClientMatchesNetHTTP(f *testing.F) {
	for _, p := range responseProbes {
		f.Add([]byte(p))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkClientMatches(t, data)
	})
}

func checkClientMatches(t *testing.T, data []byte) (taken bool) {
	t.Helper()
	r, body, err := clientRead(data)
	if err != nil && r == nil {
		return false // refused before the body: the router answers 502 or retries
	}
	// As net/http's Transport: informational answers are skipped.
	nbr := bufio.NewReader(bytes.NewReader(data))
	want, nerr := http.ReadResponse(nbr, &http.Request{Method: "POST"})
	for i := 0; nerr == nil && want.StatusCode >= 100 && want.StatusCode < 200 && want.StatusCode != 101 && i < 5; i++ {
		want, nerr = http.ReadResponse(nbr, &http.Request{Method: "POST"})
	}
	if nerr != nil {
		t.Fatalf("the client took an answer net/http refuses (%v):\n%q", nerr, data)
	}
	wbody, werr := io.ReadAll(want.Body)
	if err != nil {
		if werr == nil && !bytes.Equal(wbody, body) {
			// net/http read it whole where the client broke off: only if
			// net/http read more, never less.
			t.Fatalf("the client broke off (%v) an answer net/http reads whole:\n%q", err, data)
		}
		return true
	}
	if werr != nil {
		t.Fatalf("the client read whole (%q) an answer net/http breaks off (%v):\n%q", body, werr, data)
	}
	if want.StatusCode != r.Status || !bytes.Equal(wbody, body) {
		t.Fatalf("client %d %q, net/http %d %q for\n%q", r.Status, body, want.StatusCode, wbody, data)
	}
	got := http.Header{}
	for _, h := range r.Header {
		got[h.Key] = append(got[h.Key], h.Value)
	}
	wh := want.Header.Clone()
	for _, k := range hopByHop {
		delete(wh, k)
	}
	if want.StatusCode == 204 || want.StatusCode == 304 {
		delete(wh, "Content-Length") // kept by net/http, meaningless without a body: the router sends none
	}
	if len(got) != len(wh) {
		t.Fatalf("headers: client %q, net/http %q for\n%q", got, wh, data)
	}
	for k, v := range wh {
		if !slices.Equal(got[k], v) {
			t.Fatalf("header %s: client %q, net/http %q for\n%q", k, got[k], v, data)
		}
	}
	return true
}

func TestClientProbes(t *testing.T) {
	for _, p := range responseProbes {
		checkClientMatches(t, []byte(p))
	}
}
