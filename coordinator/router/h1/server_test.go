package h1

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// capConn records what is written to it.
type capConn struct {
	net.Conn
	b strings.Builder
}

func (c *capConn) Write(p []byte) (int, error)      { return c.b.Write(p) }
func (c *capConn) SetWriteDeadline(time.Time) error { return nil }

func TestFrontWriterFraming(t *testing.T) {
	for _, tc := range []struct {
		name   string
		run    func(w *ResponseWriter)
		want   []string // in order on the wire
		broken bool
	}{
		{"computed length", func(w *ResponseWriter) { w.WriteHeader(404); _, _ = io.WriteString(w, "nope") },
			[]string{"HTTP/1.1 404 Not Found\r\n", "Content-Length: 4", "\r\n\r\nnope"}, false},
		{"declared length", func(w *ResponseWriter) {
			w.Header().Set("Content-Length", "5")
			_, _ = io.WriteString(w, "he")
			_, _ = io.WriteString(w, "llo")
		}, []string{"HTTP/1.1 200 OK\r\n", "Content-Length: 5", "\r\n\r\nhello"}, false},
		{"short of declared", func(w *ResponseWriter) {
			w.Header().Set("Content-Length", "10")
			_, _ = io.WriteString(w, "abc")
		}, []string{"Content-Length: 10", "\r\n\r\nabc"}, true},
		{"flushed: chunked", func(w *ResponseWriter) {
			_, _ = io.WriteString(w, "data: a\n\n")
			w.Flush()
			_, _ = io.WriteString(w, "data: b\n\n")
			w.Flush()
		}, []string{"Transfer-Encoding: chunked", "\r\n\r\n9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n0\r\n\r\n"}, false},
		{"big unflushed: chunked", func(w *ResponseWriter) { _, _ = w.Write(make([]byte, 70<<10)) },
			[]string{"Transfer-Encoding: chunked", "\r\n11800\r\n", "\r\n0\r\n\r\n"}, false},
		{"no body", func(w *ResponseWriter) {}, []string{"HTTP/1.1 200 OK\r\n", "Content-Length: 0\r\n"}, false},
		{"header injection", func(w *ResponseWriter) { w.Header()["X-A"] = []string{"a\r\nSet-Cookie: x"} },
			[]string{"X-A: a  Set-Cookie: x\r\n"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &capConn{}
			w := &ResponseWriter{c: c, idle: time.Minute}
			w.reset(false)
			tc.run(w)
			require.NoError(t, w.finish())
			got := c.b.String()
			at := 0
			for _, s := range tc.want {
				i := strings.Index(got[at:], s)
				require.GreaterOrEqual(t, i, 0, "%q not found (in order) in %q", s, got)
				at += i + len(s)
			}
			require.Equal(t, tc.broken, w.broken)
			require.Equal(t, 1, strings.Count(got, "Date: "))
		})
	}
}
