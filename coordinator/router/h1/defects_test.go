package h1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The HTTP defects found by probing the router byte by byte, each with the
// test that failed before its fix.

// TestClientNeverHandsOnAnotherAnswer (defect 1, response queue poisoning):
// an engine that sends more than its Content-Length, counts it in
// characters, sends a body with a 204, or writes unasked bytes later, costs
// its connection; five requests in a row each get their own answer.
func TestClientNeverHandsOnAnotherAnswer(t *testing.T) {
	for name, answer := range map[string]func(n int) string{
		"over content-length": func(n int) string {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nA%dHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nXX", n)
		},
		"length in characters": func(n int) string {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nA%dé", n) // é is two bytes
		},
		"204 with a body": func(n int) string {
			return fmt.Sprintf("HTTP/1.1 204 No Content\r\nX-N: A%d\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nXX", n)
		},
	} {
		t.Run(name, func(t *testing.T) {
			e := newRawEngine(t, func(n int) (string, bool) { return answer(n), false })
			u := NewClient()
			defer u.CloseIdle()
			for i := 1; i <= 5; i++ {
				r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, []byte("{}"), time.Second)
				require.NoError(t, err, "request %d", i)
				got := readAll(t, r)
				if r.Status == 204 {
					got = r.Header[0].Value
				}
				require.True(t, strings.HasPrefix(got, fmt.Sprintf("A%d", i)), "request %d got %q", i, got)
			}
			require.Equal(t, int32(5), e.handled.Load())
		})
	}
	t.Run("unasked bytes later", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		wrote := make(chan struct{}, 8)
		n := 0
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func(c net.Conn) {
					defer c.Close()
					br := bufio.NewReader(c)
					for {
						if _, err := http.ReadRequest(br); err != nil {
							return
						}
						n++
						fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nA%d", n)
						time.Sleep(20 * time.Millisecond)
						_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nXX") // nobody asked
						wrote <- struct{}{}
					}
				}(c)
			}
		}()
		u := NewClient()
		defer u.CloseIdle()
		for i := 1; i <= 5; i++ {
			r, err := u.Do(context.Background(), ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
			require.NoError(t, err)
			require.Equal(t, fmt.Sprintf("A%d", i), readAll(t, r))
			<-wrote
		}
	})
}

// TestClientCutBodyIsAnError (defect 2): a chunked or SSE body the engine
// ends early, or whose chunk-size line ends in a bare LF, is ErrTruncated,
// never a clean EOF.
func TestClientCutBodyIsAnError(t *testing.T) {
	for name, resp := range map[string]string{
		"closed mid-chunk":  "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n9\r\ndata",
		"closed at a chunk": "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n",
		"bare LF size line": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
		"short of length":   "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
	} {
		t.Run(name, func(t *testing.T) {
			e := newRawEngine(t, func(int) (string, bool) { return resp, true })
			u := NewClient()
			defer u.CloseIdle()
			r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
			require.NoError(t, err)
			_, err = io.ReadAll(r)
			require.ErrorIs(t, err, ErrTruncated)
			require.NoError(t, r.Close())
		})
	}
}

// TestClientHeaderNamesAreTokens (defect 5): a header name with a bare CR,
// a NUL or a space before the colon is refused, never passed on.
func TestClientHeaderNamesAreTokens(t *testing.T) {
	for _, line := range []string{"X-A\rContent-Length: 0", "X-A\x00: 1", "X-A : 1", "X-A: b\x00c"} {
		e := newRawEngine(t, func(int) (string, bool) {
			return "HTTP/1.1 200 OK\r\n" + line + "\r\nContent-Length: 2\r\n\r\nok", true
		})
		_, err := NewClient().Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
		var pe *ProtocolError
		require.ErrorAs(t, err, &pe, "%q", line)
	}
}

// TestClientFraming (defect 6, 7b): chunked framing drops every
// Content-Length; a signed length is refused; an unasked 101 is refused.
func TestClientFraming(t *testing.T) {
	body := strings.Repeat("x", 180)
	chunked := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body)
	for _, head := range []string{"Content-Length: 7\r\nTransfer-Encoding: chunked", "Content-Length: 7\r\nContent-Length: 7\r\nTransfer-Encoding: chunked"} {
		e := newRawEngine(t, func(int) (string, bool) { return "HTTP/1.1 200 OK\r\n" + head + "\r\n\r\n" + chunked, false })
		u := NewClient()
		r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
		require.NoError(t, err)
		for _, h := range r.Header {
			require.NotEqual(t, "Content-Length", h.Key)
		}
		require.Equal(t, body, readAll(t, r))
		u.CloseIdle()
	}
	for resp, want := range map[string]string{
		"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok":                             "bad Content-Length",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n":              "switched protocols",
		strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 6) + "HTTP/1.1 200 OK\r\n": "informational",
	} {
		e := newRawEngine(t, func(int) (string, bool) { return resp, true })
		_, err := NewClient().Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
		require.ErrorContains(t, err, want)
	}
}

// TestClientHearsAnEarlyAnswer (defect 7a): an engine that answers (413)
// before reading a large body, and stops reading, is heard at once, not
// when its connection times out.
func TestClientHearsAnEarlyAnswer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	release := make(chan struct{})
	defer close(release)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		_, _ = io.WriteString(c, "HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 8\r\n\r\ntoo long")
		<-release // holds the connection open, reading nothing more
	}()
	u := NewClient()
	defer u.CloseIdle()
	start := time.Now()
	r, err := u.Do(context.Background(), ln.Addr().String(), "POST", "/x", nil, make([]byte, 32<<20), 5*time.Second)
	require.NoError(t, err)
	require.Equal(t, 413, r.Status)
	require.Equal(t, "too long", readAll(t, r))
	require.Less(t, time.Since(start), 3*time.Second)
	require.Zero(t, u.Idle(ln.Addr().String()), "a connection answered mid-body is not reused")
}

// TestClientSweepsWithoutTraffic (defect 7g): expired pooled connections
// are closed with no further request to find them.
func TestClientSweepsWithoutTraffic(t *testing.T) {
	e := newRawEngine(t, func(int) (string, bool) { return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false })
	u := NewClient()
	defer u.CloseIdle()
	u.idleFor = 50 * time.Millisecond
	r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
	require.NoError(t, err)
	readAll(t, r)
	require.Equal(t, 1, u.Idle(e.ln.Addr().String()))
	require.Eventually(t, func() bool { return u.Idle(e.ln.Addr().String()) == 0 }, 2*time.Second, 10*time.Millisecond)
}

// testServer runs a Server whose fast path echoes the body and whose
// fallback answers "fallback".
func testServer(t *testing.T, cfg Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	if cfg.Handler == nil {
		cfg.Handler = func(w http.ResponseWriter, req *http.Request, body func() ([]byte, error)) {
			if req.Header.Get("Authorization") != "Bearer k" {
				w.WriteHeader(401) // refused before the body is read
				return
			}
			b, err := body()
			if err != nil {
				w.WriteHeader(413)
				return
			}
			_, _ = w.Write(b)
		}
	}
	if cfg.Fallback == nil {
		cfg.Fallback = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			_, _ = io.WriteString(w, "fallback")
		})
	}
	cfg.Paths = []string{"/v1/completions"}
	cfg.Keep = []string{"Authorization"}
	s := NewServer(ln, cfg)
	go func() { _ = s.Serve() }()
	t.Cleanup(func() { _ = s.Close() })
	return ln.Addr().String()
}

// closedWithin: the server closes c within d (read returns EOF or reset).
func closedWithin(t *testing.T, c net.Conn, d time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "still open after %v", d)
	return time.Since(start)
}

const fastReq = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\n\r\n{}"

// TestServerTimeouts (defect 3): a silent new connection, a connection idle
// after a request (fast path or handed over), a trickled head and a stalled
// body are all closed in bounded time.
func TestServerTimeouts(t *testing.T) {
	addr := testServer(t, Config{HeadTimeout: 200 * time.Millisecond, IdleTimeout: 400 * time.Millisecond})
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	t.Run("silent new connection", func(t *testing.T) {
		require.Less(t, closedWithin(t, dial(), 3*time.Second), 1500*time.Millisecond)
	})
	t.Run("idle after a fast-path request", func(t *testing.T) {
		c := dial()
		_, _ = io.WriteString(c, fastReq)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err)
		require.Equal(t, 200, resp.StatusCode)
		require.Less(t, closedWithin(t, c, 3*time.Second), 2*time.Second)
	})
	t.Run("idle after a handed-over request", func(t *testing.T) {
		c := dial()
		_, _ = io.WriteString(c, "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err)
		require.Equal(t, 200, resp.StatusCode)
		require.Less(t, closedWithin(t, c, 3*time.Second), 2*time.Second)
	})
	t.Run("trickled head", func(t *testing.T) {
		// Its own server with a longer head timeout: one timeout (1 s) is
		// told from two (the fast path's, then net/http's) with room for a
		// busy machine.
		c, err := net.Dial("tcp", testServer(t, Config{HeadTimeout: time.Second}))
		require.NoError(t, err)
		defer c.Close()
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			for _, b := range []byte("POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
			}
		}()
		took := closedWithin(t, c, 4*time.Second)
		require.Less(t, took, 1700*time.Millisecond, "one head timeout, not two")
		require.Greater(t, took, 900*time.Millisecond)
	})
	t.Run("stalled chunked body", func(t *testing.T) {
		c := dial()
		_, _ = io.WriteString(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab")
		require.Less(t, closedWithin(t, c, 3*time.Second), 2*time.Second)
	})
}

// TestServerRefusesBeforeTheBody (defect 4): a request refused on its head
// (no key) is answered before its body arrives, and the body is never read.
func TestServerRefusesBeforeTheBody(t *testing.T) {
	addr := testServer(t, Config{})
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	_, _ = io.WriteString(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err, "answered without waiting for the 50 MB body")
	require.Equal(t, 401, resp.StatusCode)
	require.True(t, resp.Close)
}

// TestServerHandsOverAtOnce (defect 7c, 7d): a bare-LF request is handed
// over at once (not after the head timeout); two Host headers or an invalid
// one get net/http's 400.
func TestServerHandsOverAtOnce(t *testing.T) {
	addr := testServer(t, Config{HeadTimeout: 5 * time.Second})
	for req, want := range map[string]int{
		"POST /v1/completions HTTP/1.1\nHost: x\nAuthorization: Bearer k\nContent-Length: 2\n\n{}":                      200,
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nHost: y\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\n\r\n{}": 400,
		"POST /v1/completions HTTP/1.1\r\nHost: a b\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\n\r\n{}":          400,
	} {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		start := time.Now()
		_, _ = io.WriteString(c, req)
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err, "%q", req)
		require.Equal(t, want, resp.StatusCode, "%q", req)
		require.Less(t, time.Since(start), 2*time.Second)
		_ = c.Close()
	}
}

// TestServerClosesInOrder (defect 7e, 7f): an answer with Connection: close
// is followed by an orderly close, not a reset, even with more bytes
// pipelined behind it; a request with Transfer-Encoding (here with a
// Content-Length too) closes its connection after the answer.
func TestServerClosesInOrder(t *testing.T) {
	addr := testServer(t, Config{})
	for _, req := range []string{
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}" + strings.Repeat(fastReq, 2000),
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + fastReq,
	} {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		_, err = io.WriteString(c, req)
		require.NoError(t, err)
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		_, err = io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.True(t, resp.Close)
		rest, err := io.ReadAll(br)
		require.NoError(t, err, "an orderly close (EOF), not a reset")
		require.Empty(t, rest, "no answer to what came after")
		_ = c.Close()
	}
}

// TestServerCapsConnections: a connection over MaxConns is closed at once.
func TestServerCapsConnections(t *testing.T) {
	addr := testServer(t, Config{MaxConns: 2})
	var held []net.Conn
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		_, _ = io.WriteString(c, fastReq)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err)
		require.Equal(t, 200, resp.StatusCode)
		held = append(held, c)
	}
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	_, _ = io.WriteString(c, fastReq)
	closedWithin(t, c, 2*time.Second)
	_ = held[0].Close()
	require.Eventually(t, func() bool {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return false
		}
		defer c.Close()
		_, _ = io.WriteString(c, fastReq)
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		return err == nil && resp.StatusCode == 200
	}, 3*time.Second, 20*time.Millisecond, "a freed slot takes a new connection")
}

// TestWriterNoBodyStatuses (defect 6): a 204 or 304 carries no
// Content-Length and no body; an aborted answer gets no final chunk.
func TestWriterNoBodyStatuses(t *testing.T) {
	for _, code := range []int{204, 304} {
		c := &capConn{}
		w := &ResponseWriter{c: c, idle: time.Minute}
		w.reset(false)
		w.Header().Set("Content-Length", "4")
		w.WriteHeader(code)
		_, err := w.Write([]byte("body"))
		require.ErrorIs(t, err, http.ErrBodyNotAllowed)
		require.NoError(t, w.finish())
		require.NotContains(t, c.b.String(), "Content-Length")
		require.True(t, strings.HasSuffix(c.b.String(), "\r\n\r\n"), c.b.String())
		require.False(t, w.broken)
	}
	c := &capConn{}
	w := &ResponseWriter{c: c, idle: time.Minute}
	w.reset(false)
	_, _ = io.WriteString(w, "data: a\n\n")
	w.Flush()
	w.Abort()
	require.NoError(t, w.finish())
	require.NotContains(t, c.b.String(), "0\r\n\r\n")
	require.True(t, w.broken)
}

// TestReadBodyExactSize: a declared length is read into a buffer of its own
// size class, not the next one.
func TestReadBodyExactSize(t *testing.T) {
	b, bp, err := ReadBody(bytes.NewReader(make([]byte, 8192)), 8192, 1<<20)
	require.NoError(t, err)
	require.Len(t, b, 8192)
	require.Equal(t, 8192, cap(*bp))
	PutBuf(bp)
}
