package router

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// misbehavingEngine answers each request on a connection with answer(n),
// written exactly as given (closing the connection after one that says
// Connection: close); n counts requests over all connections.
func misbehavingEngine(t *testing.T, answer func(n int) string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	count := make(chan int, 1)
	count <- 0
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
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					n := <-count + 1
					count <- n
					a := answer(n)
					if _, err := io.WriteString(c, a); err != nil || strings.Contains(a, "Connection: close") {
						return
					}
				}
			}(c)
		}
	}()
	return ln.Addr().String()
}

// TestFiveClientsEachGetTheirOwnAnswer: an engine whose answers carry more
// bytes than their Content-Length (or a body with a 204) poisoned the
// router's pooled connection: the next client got the extra bytes as its
// answer, and every later one the answer before its own. Now five clients
// in a row, each on its own connection to the router, get their own.
func TestFiveClientsEachGetTheirOwnAnswer(t *testing.T) {
	for name, answer := range map[string]func(n int) string{
		"over content-length": func(n int) string {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"n\":\"%02d\"}\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"n\":\"XX\"}", n)
		},
		"204 with a body": func(n int) string {
			return fmt.Sprintf("HTTP/1.1 204 No Content\r\nX-N: %02d\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"n\":\"XX\"}", n)
		},
	} {
		t.Run(name, func(t *testing.T) {
			eng := misbehavingEngine(t, answer)
			r, _ := newRouter(&Endpoint{Model: "m", Addr: eng, Group: "g"})
			front := startFront(t, r)
			for i := 1; i <= 5; i++ {
				resp := rawExchange(t, front, post("/v1/completions", `{"model":"m"}`), 1)[0]
				got := body(t, resp)
				if resp.StatusCode == 204 {
					got = resp.Header.Get("X-N")
					require.Empty(t, resp.Header.Get("Content-Length"), "a 204 carries no length")
				}
				require.Contains(t, got, fmt.Sprintf("%02d", i), "client %d", i)
			}
		})
	}
}

// TestCutStreamIsNotACompleteAnswer: an engine that closes mid-stream was
// passed on as a complete 200 (final chunk written, connection kept). Now
// the client's read fails, on the fast path and through net/http.
func TestCutStreamIsNotACompleteAnswer(t *testing.T) {
	eng := misbehavingEngine(t, func(int) string {
		return "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n9\r\ndata: a\n\n\r\n9\r\ndata"
	})
	r, _ := newRouter(&Endpoint{Model: "m", Addr: eng, Group: "g"})
	front := startFront(t, r)
	// The fast path.
	c, err := net.Dial("tcp", front)
	require.NoError(t, err)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, post("/v1/completions", `{"model":"m","stream":true}`))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	require.Equal(t, 200, resp.StatusCode)
	b, err := io.ReadAll(resp.Body)
	require.Error(t, err, "a cut stream must not read as whole")
	require.Contains(t, string(b), "data: a")
	// Through net/http (a GET first hands the connection over).
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err = hc.Post("http://"+front+"/v1/completions", "application/json", strings.NewReader(`{"model":"m","stream":true}`))
	require.NoError(t, err)
	_, err = io.ReadAll(resp.Body)
	require.Error(t, err)
	_ = resp.Body.Close()
	// The handed-over path: a GET first, then the stream on the same connection.
	c2, err := net.Dial("tcp", front)
	require.NoError(t, err)
	defer c2.Close()
	_ = c2.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c2, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"+post("/v1/completions", `{"model":"m","stream":true}`))
	br := bufio.NewReader(c2)
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	_, _ = io.ReadAll(resp.Body)
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	_, err = io.ReadAll(resp.Body)
	require.Error(t, err, "net/http aborts the answer")
}

// TestKeyIsCheckedBeforeTheBody: a keyless client announcing a 50 MB body
// got nothing until it sent all of it (and the router held it); now it is
// answered 401 on its head, on the fast path and with Expect: 100-continue
// through net/http (no 100 Continue is sent).
func TestKeyIsCheckedBeforeTheBody(t *testing.T) {
	key, e, err := NewKey("team", []string{"*"}, 0, 0)
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "keys.yaml")
	require.NoError(t, os.WriteFile(p, []byte("keys:\n"+indent(MarshalEntry(e))), 0o600))
	keys, err := LoadAPIKeys(p)
	require.NoError(t, err)
	tb := NewTable()
	tb.Set(NewSnapshot([]string{"m"}, nil))
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{APIKeys: keys})
	front := startFront(t, r)
	for _, head := range []string{
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n",
		"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 50000000\r\n\r\n",
	} {
		c, err := net.Dial("tcp", front)
		require.NoError(t, err)
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		_, _ = io.WriteString(c, head)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err, "answered on the head: %q", head)
		require.Equal(t, 401, resp.StatusCode)
		_ = c.Close()
	}
	_ = key
}
