package h1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// rawEngine is a TCP server that answers each request on a connection with
// the next scripted response, exactly as written. It counts connections and
// records the requests' heads and bodies.
type rawEngine struct {
	ln      net.Listener
	conns   atomic.Int32
	mu      sync.Mutex
	reqs    []string
	answer  func(n int) (resp string, closeAfter bool)
	handled atomic.Int32
}

func newRawEngine(t *testing.T, answer func(n int) (string, bool)) *rawEngine {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	e := &rawEngine{ln: ln, answer: answer}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.conns.Add(1)
			go e.serve(c)
		}
	}()
	return e
}

func (e *rawEngine) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		var head strings.Builder
		n := 0
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			head.WriteString(line)
			if k, v, ok := strings.Cut(strings.TrimSpace(line), ": "); ok && strings.EqualFold(k, "Content-Length") {
				n = atoiOr(v, 0)
			}
			if line == "\r\n" {
				break
			}
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(br, body); err != nil {
			return
		}
		e.mu.Lock()
		e.reqs = append(e.reqs, head.String()+string(body))
		e.mu.Unlock()
		resp, closeAfter := e.answer(int(e.handled.Add(1)))
		if _, err := io.WriteString(c, resp); err != nil || closeAfter {
			return
		}
	}
}

func atoiOr(s string, d int) int {
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return d
		}
		n = n*10 + int(c-'0')
	}
	return n
}

func readAll(t *testing.T, r *Response) string {
	t.Helper()
	b, err := io.ReadAll(r)
	require.NoError(t, err)
	require.NoError(t, r.Close())
	return string(b)
}

func TestUpstreamFraming(t *testing.T) {
	cases := []struct {
		name   string
		resp   string
		status int
		body   string
		sse    bool
		reused bool // the second request rides the same connection
		hdr    string
	}{
		{"content-length", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}", 200, `{"a":1}`, false, true, "application/json"},
		{"chunked with trailer", "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n" +
			"6\r\ndata: \r\n3\r\nx\n\n\r\n0\r\nX-Trailer: 1\r\n\r\n", 200, "data: x\n\n", true, true, "text/event-stream; charset=utf-8"},
		{"no length, until close", "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello", 200, "hello", false, false, "text/plain"},
		{"connection close", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: a/b\r\nContent-Length: 2\r\n\r\nok", 200, "ok", false, false, "a/b"},
		{"100 continue first", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: a/b\r\nContent-Length: 1\r\n\r\nz", 201, "z", false, true, "a/b"},
		{"204 no body", "HTTP/1.1 204 No Content\r\nContent-Type: a/b\r\n\r\n", 204, "", false, true, "a/b"},
		{"bare LF lines", "HTTP/1.1 500 Internal Server Error\nContent-Type: a/b\nContent-Length: 3\n\nbad", 500, "bad", false, true, "a/b"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newRawEngine(t, func(int) (string, bool) { return tc.resp, strings.HasPrefix(tc.resp, "HTTP/1.0") })
			u := NewClient()
			defer u.CloseIdle()
			for i := 0; i < 2; i++ {
				r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/v1/completions",
					[]Header{{"Content-Type", "application/json"}}, []byte(`{"model":"m"}`), time.Second)
				require.NoError(t, err)
				require.Equal(t, tc.status, r.Status)
				require.Equal(t, tc.sse, r.SSE)
				var ct string
				for _, h := range r.Header {
					require.NotContains(t, []string{"Transfer-Encoding", "Connection"}, h.Key, "hop-by-hop header passed on")
					if h.Key == "Content-Type" {
						ct = h.Value
					}
				}
				require.Equal(t, tc.hdr, ct)
				require.Equal(t, tc.body, readAll(t, r))
			}
			want := int32(2)
			if tc.reused {
				want = 1
			}
			require.Equal(t, want, e.conns.Load(), "connections used for two requests")
			e.mu.Lock()
			defer e.mu.Unlock()
			require.Len(t, e.reqs, 2)
			require.True(t, strings.HasPrefix(e.reqs[0], "POST /v1/completions HTTP/1.1\r\nHost: "+e.ln.Addr().String()+"\r\nContent-Length: 13\r\n"), e.reqs[0])
			require.True(t, strings.HasSuffix(e.reqs[0], "Content-Type: application/json\r\n\r\n{\"model\":\"m\"}"), e.reqs[0])
		})
	}
}

func TestUpstreamLargeBodyIsWrittenWhole(t *testing.T) {
	e := newRawEngine(t, func(int) (string, bool) { return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false })
	u := NewClient()
	defer u.CloseIdle()
	body := bytes.Repeat([]byte("0123456789"), 30_000)
	r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/v1/completions", nil, body, 5*time.Second)
	require.NoError(t, err)
	require.Equal(t, "ok", readAll(t, r))
	e.mu.Lock()
	defer e.mu.Unlock()
	require.True(t, strings.HasSuffix(e.reqs[0], "\r\n\r\n"+string(body)))
}

func TestUpstreamMalformedResponses(t *testing.T) {
	for _, tc := range []struct{ name, resp, want string }{
		{"not http", "SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"},
		{"bad status", "HTTP/1.1 2x0 OK\r\n\r\n", "malformed status line"},
		{"http/2 preface", "HTTP/2 200\r\n\r\n", "malformed status line"},
		{"bad length", "HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n", "bad Content-Length"},
		{"two lengths", "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", "bad Content-Length"},
		{"gzip framing", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"},
		{"header without colon", "HTTP/1.1 200 OK\r\nnocolon\r\n\r\n", "malformed header line"},
		{"too many headers", "HTTP/1.1 200 OK\r\n" + strings.Repeat("X-A: 1\r\n", 101) + "\r\n", "over 100 response headers"},
		{"huge header line", "HTTP/1.1 200 OK\r\nX-A: " + strings.Repeat("a", 20<<10) + "\r\n\r\n", "over 16 KiB"},
		{"closed at once", "", "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newRawEngine(t, func(int) (string, bool) { return tc.resp, true })
			u := NewClient()
			_, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
			require.ErrorContains(t, err, tc.want)
			var eb *ErrBeforeResponse
			require.ErrorAs(t, err, &eb)
		})
	}
}

// TestUpstreamStalePooledConnection: an engine closes a keep-alive connection
// the router holds (uvicorn after 5 s idle); the next request goes out on a
// new connection without the caller seeing an error.
func TestUpstreamStalePooledConnection(t *testing.T) {
	e := newRawEngine(t, func(n int) (string, bool) {
		// Claims keep-alive, then closes: the pooled connection is dead.
		return "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + string(rune('0'+n)), true
	})
	u := NewClient()
	defer u.CloseIdle()
	for i := 1; i <= 3; i++ {
		r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
		require.NoError(t, err)
		require.Equal(t, string(rune('0'+i)), readAll(t, r))
		time.Sleep(20 * time.Millisecond) // the close reaches the router
	}
	require.Equal(t, int32(3), e.conns.Load())
	require.Equal(t, int32(3), e.handled.Load(), "each request reached the engine exactly once")
}

func TestUpstreamPoolExpiry(t *testing.T) {
	e := newRawEngine(t, func(int) (string, bool) { return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false })
	u := NewClient()
	defer u.CloseIdle()
	u.idleFor = 50 * time.Millisecond
	for i := 0; i < 2; i++ {
		r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
		require.NoError(t, err)
		require.Equal(t, "", readAll(t, r))
		time.Sleep(80 * time.Millisecond)
	}
	require.Equal(t, int32(2), e.conns.Load(), "a connection idle past idleFor is not reused")
}

// TestUpstreamIdleAndCancel: a stream that stalls ends after the idle
// timeout; a cancelled context ends it at once; the engine sees its
// connection closed both times (that is how vLLM aborts the request).
func TestUpstreamIdleAndCancel(t *testing.T) {
	closed := make(chan struct{}, 4)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = c.Read(make([]byte, 4096))
				_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
				_, _ = io.Copy(io.Discard, c) // until the router closes
				closed <- struct{}{}
			}()
		}
	}()
	engineSawClose := func(t *testing.T) {
		select {
		case <-closed:
		case <-time.After(2 * time.Second):
			t.Fatal("the engine's connection stayed open")
		}
	}
	u := NewClient()
	t.Run("idle", func(t *testing.T) {
		r, err := u.Do(context.Background(), ln.Addr().String(), "POST", "/x", nil, nil, 200*time.Millisecond)
		require.NoError(t, err)
		start := time.Now()
		b, err := io.ReadAll(r)
		require.Equal(t, "hello", string(b))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		require.InDelta(t, 0.2, time.Since(start).Seconds(), 0.15)
		require.NoError(t, r.Close())
		engineSawClose(t)
	})
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		r, err := u.Do(ctx, ln.Addr().String(), "POST", "/x", nil, nil, time.Minute)
		require.NoError(t, err)
		buf := make([]byte, 64)
		n, err := r.Read(buf)
		require.NoError(t, err)
		require.Equal(t, "hello", string(buf[:n]))
		time.AfterFunc(50*time.Millisecond, cancel)
		start := time.Now()
		_, err = r.Read(buf)
		require.Error(t, err)
		require.Less(t, time.Since(start), time.Second)
		require.NoError(t, r.Close())
		engineSawClose(t)
	})
	t.Run("refused", func(t *testing.T) {
		l2, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := l2.Addr().String()
		l2.Close()
		_, err = u.Do(context.Background(), addr, "POST", "/x", nil, nil, time.Second)
		var eb *ErrBeforeResponse
		require.ErrorAs(t, err, &eb)
		require.False(t, eb.ReusedConn)
	})
}

// scriptConn is a net.Conn that answers with fixed bytes and swallows writes.
type scriptConn struct {
	r *bytes.Reader
	net.Conn
}

func (c *scriptConn) Read(p []byte) (int, error)          { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)         { return len(p), nil }
func (c *scriptConn) Close() error                        { return nil }
func (c *scriptConn) SetDeadline(time.Time) error         { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error     { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error    { return nil }
func (c *scriptConn) LocalAddr() net.Addr                 { return &net.TCPAddr{} }
func (c *scriptConn) RemoteAddr() net.Addr                { return &net.TCPAddr{} }
func (c *scriptConn) ReadFrom(r io.Reader) (int64, error) { return io.Copy(io.Discard, r) }

// FuzzUpstreamResponse: whatever an engine (or something posing as one)
// answers, the router gets a response or an error, never a panic or a hang,
// and a body never longer than the engine sent.
func FuzzUpstreamResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nok",
		"HTTP/1.0 200 OK\r\n\r\nuntil close",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 x\r\nContent-Length: 1\r\n\r\n!",
		"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
		"HTTP/1.1 200\r\nConnection: close, keep-alive\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		u := NewClient()
		addr := "127.0.0.1:1" // a retry after a failure dials this and is refused
		u.idle[addr] = []*conn{{Conn: &scriptConn{r: bytes.NewReader(data)}, addr: addr, last: time.Now()}}
		u.idle[addr][0].br = bufio.NewReaderSize(u.idle[addr][0].Conn, 16<<10)
		r, err := u.Do(context.Background(), addr, "POST", "/x", nil, []byte("{}"), time.Second)
		if err != nil {
			var eb *ErrBeforeResponse
			if !errors.As(err, &eb) {
				t.Fatalf("error %v is not an ErrBeforeResponse", err)
			}
			return
		}
		if r.Status < 100 || r.Status > 599 {
			t.Fatalf("status %d", r.Status)
		}
		n, _ := io.Copy(io.Discard, r)
		if n > int64(len(data)) {
			t.Fatalf("read %d body bytes from %d input bytes", n, len(data))
		}
		_ = r.Close()
	})
}

// TestUpstreamSweepsGoneBackends: pooled connections to a backend nobody
// sends to any more are closed once they expire, found by traffic to others.
func TestUpstreamSweepsGoneBackends(t *testing.T) {
	ok := func(int) (string, bool) { return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false }
	gone, live := newRawEngine(t, ok), newRawEngine(t, ok)
	u := NewClient()
	defer u.CloseIdle()
	u.idleFor = 50 * time.Millisecond
	for _, e := range []*rawEngine{gone, live} {
		r, err := u.Do(context.Background(), e.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
		require.NoError(t, err)
		readAll(t, r)
	}
	time.Sleep(80 * time.Millisecond)
	r, err := u.Do(context.Background(), live.ln.Addr().String(), "POST", "/x", nil, nil, time.Second)
	require.NoError(t, err)
	readAll(t, r)
	u.mu.Lock()
	defer u.mu.Unlock()
	require.NotContains(t, u.idle, gone.ln.Addr().String())
	require.Len(t, u.idle[live.ln.Addr().String()], 1)
}
