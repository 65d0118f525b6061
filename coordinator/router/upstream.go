package router

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// upstream is the router's HTTP/1.1 client to engines: pooled keep-alive
// connections per backend, a request written with one writev (head + body,
// the body never copied), the response read on the caller's goroutine.
// net/http's Transport hands every request between three goroutines (caller,
// writeLoop, readLoop) and builds header maps both ways; on a 2-core host that
// was most of the router's cost per short request (BenchmarkProxy).
type upstream struct {
	dial    net.Dialer
	maxIdle int           // pooled connections per backend
	idleFor time.Duration // pooled connections older than this are closed, not reused

	mu    sync.Mutex
	idle  map[string][]*upConn
	swept time.Time // last sweep of expired connections
}

// upIdleFor stays under uvicorn's keep-alive timeout (5 s), which vLLM's
// OpenAI server uses: a connection the engine is about to close is not reused.
const upIdleFor = 4 * time.Second

func newUpstream() *upstream {
	return &upstream{
		dial:    net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second},
		maxIdle: 1024,
		idleFor: upIdleFor,
		idle:    map[string][]*upConn{},
	}
}

type upConn struct {
	net.Conn
	br   *bufio.Reader
	addr string
	last time.Time // when it went back to the pool
}

// get returns a pooled connection to addr (reused=true) or dials one.
func (u *upstream) get(ctx context.Context, addr string) (*upConn, bool, error) {
	now := time.Now()
	u.mu.Lock()
	for l := u.idle[addr]; len(l) > 0; l = u.idle[addr] {
		c := l[len(l)-1]
		u.idle[addr] = l[:len(l)-1]
		if now.Sub(c.last) < u.idleFor {
			u.mu.Unlock()
			return c, true, nil
		}
		_ = c.Close()
	}
	u.mu.Unlock()
	nc, err := u.dial.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	return &upConn{Conn: nc, br: bufio.NewReaderSize(nc, 16<<10), addr: addr}, false, nil
}

// put returns a connection whose response was read to its end.
func (u *upstream) put(c *upConn) {
	// Its deadline stays: IdleTimeout outlives the pool's idleFor, and the
	// next request sets a new one.
	c.last = time.Now()
	u.mu.Lock()
	if c.last.Sub(u.swept) > u.idleFor {
		u.sweepLocked(c.last)
	}
	if l := u.idle[c.addr]; len(l) < u.maxIdle {
		u.idle[c.addr] = append(l, c)
		u.mu.Unlock()
		return
	}
	u.mu.Unlock()
	_ = c.Close()
}

// sweepLocked closes expired pooled connections of every backend, so those
// of a backend that went away (no more requests to find them) do not linger.
func (u *upstream) sweepLocked(now time.Time) {
	u.swept = now
	for a, l := range u.idle {
		keep := l[:0]
		for _, c := range l {
			if now.Sub(c.last) < u.idleFor {
				keep = append(keep, c)
			} else {
				_ = c.Close()
			}
		}
		clear(l[len(keep):])
		if len(keep) == 0 {
			delete(u.idle, a)
		} else {
			u.idle[a] = keep
		}
	}
}

// closeIdle closes every pooled connection (the router is shutting down, tests).
func (u *upstream) closeIdle() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for a, l := range u.idle {
		for _, c := range l {
			_ = c.Close()
		}
		delete(u.idle, a)
	}
}

// upHeader is one response header line as the engine sent it.
type upHeader struct{ key, value string }

// upResponse is an engine's answer; Body reads the rest of it.
type upResponse struct {
	Status  int
	Header  []upHeader
	SSE     bool
	Length  int64 // -1: chunked or until close
	chunked bool
	close   bool // the connection cannot be reused after this response

	conn    *upConn
	u       *upstream
	body    io.Reader
	left    int64 // for Length >= 0
	done    bool  // body read to its end
	stopCtx func() bool
	idle    time.Duration
	dlAt    time.Time // when the read deadline was last pushed back
}

// errBeforeResponse wraps a failure before any byte of the response arrived;
// reusedConn says the connection came from the pool (the engine may have
// closed it meanwhile, so one fresh attempt is safe).
type errBeforeResponse struct {
	err        error
	reusedConn bool
}

func (e *errBeforeResponse) Error() string { return e.err.Error() }
func (e *errBeforeResponse) Unwrap() error { return e.err }

// aLongTimeAgo is a deadline that makes blocked I/O return at once.
var aLongTimeAgo = time.Unix(1, 0)

// headBufs recycles request-head buffers.
var headBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// do sends one request (path with its query, the headers to pass, the body)
// and reads the response head. idle bounds every wait for the engine (write
// or read); ctx ending aborts the exchange at once. A connection from the
// pool that fails before the response begins is retried once on a new one.
func (u *upstream) do(ctx context.Context, addr, method, path string, hdr []upHeader, body []byte, idle time.Duration) (*upResponse, error) {
	resp, err := u.try(ctx, addr, method, path, hdr, body, idle)
	var eb *errBeforeResponse
	if err != nil && errors.As(err, &eb) && eb.reusedConn && ctx.Err() == nil && retryableConnErr(eb.err) {
		resp, err = u.try(ctx, addr, method, path, hdr, body, idle)
	}
	return resp, err
}

func (u *upstream) try(ctx context.Context, addr, method, path string, hdr []upHeader, body []byte, idle time.Duration) (*upResponse, error) {
	c, reused, err := u.get(ctx, addr)
	if err != nil {
		return nil, &errBeforeResponse{err: err}
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(aLongTimeAgo) })
	fail := func(err error) (*upResponse, error) {
		stop()
		_ = c.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, &errBeforeResponse{err: err, reusedConn: reused}
	}
	hp := headBufs.Get().(*[]byte)
	h := append((*hp)[:0], method...)
	h = append(h, ' ')
	h = append(h, path...)
	h = append(h, " HTTP/1.1\r\nHost: "...)
	h = append(h, addr...)
	h = append(h, "\r\nContent-Length: "...)
	h = strconv.AppendInt(h, int64(len(body)), 10)
	h = append(h, "\r\n"...)
	for _, kv := range hdr {
		h = append(h, kv.key...)
		h = append(h, ": "...)
		h = append(h, kv.value...)
		h = append(h, "\r\n"...)
	}
	h = append(h, "\r\n"...)
	now := time.Now()
	_ = c.SetDeadline(now.Add(idle))
	var werr error
	if len(body) <= 4<<10 {
		// Small bodies ride in the head's buffer: one plain write.
		h = append(h, body...)
		_, werr = c.Write(h)
	} else {
		bufs := net.Buffers{h, body}
		_, werr = bufs.WriteTo(c.Conn)
	}
	*hp = h
	headBufs.Put(hp)
	if werr != nil {
		return fail(werr)
	}
	r := &upResponse{conn: c, u: u, stopCtx: stop, idle: idle, dlAt: now}
	for {
		line, err := readLine(c.br)
		if err != nil {
			return fail(err)
		}
		st, http10, err := parseStatusLine(line)
		if err != nil {
			return fail(err)
		}
		r.Status, r.close, r.Length = st, http10, -1
		r.Header = r.Header[:0]
		if err := r.readHeader(c.br); err != nil {
			return fail(err)
		}
		if st >= 100 && st < 200 && st != 101 {
			continue // 100 Continue, 103 Early Hints: the answer follows
		}
		break
	}
	switch {
	case r.Status == 204 || r.Status == 304 || method == http.MethodHead:
		r.Length, r.left = 0, 0
	case r.chunked:
		r.Length = -1
		r.body = httputil.NewChunkedReader(c.br)
	case r.Length >= 0:
		r.left = r.Length
	default:
		r.close = true // body runs until the engine closes the connection
		r.body = c.br
	}
	if r.Length == 0 {
		r.done = true
	}
	return r, nil
}

// readLine reads one CRLF- or LF-terminated line without the terminator.
// The slice is valid until the next read from br.
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		return nil, errors.New("engine sent a response header line over 16 KiB")
	}
	if err != nil {
		if err == io.EOF && len(line) == 0 {
			return nil, io.ErrUnexpectedEOF
		}
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// parseStatusLine reads "HTTP/1.x NNN reason".
func parseStatusLine(line []byte) (status int, http10 bool, err error) {
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, false, fmt.Errorf("engine sent a malformed status line %q", truncate(line, 64))
	}
	if line[7] == '0' {
		http10 = true
	} else if line[7] != '1' {
		return 0, false, fmt.Errorf("engine sent a malformed status line %q", truncate(line, 64))
	}
	c := line[9:12]
	if c[0] < '1' || c[0] > '5' || c[1] < '0' || c[1] > '9' || c[2] < '0' || c[2] > '9' || (len(line) > 12 && line[12] != ' ') {
		return 0, false, fmt.Errorf("engine sent a malformed status line %q", truncate(line, 64))
	}
	return int(c[0]-'0')*100 + int(c[1]-'0')*10 + int(c[2]-'0'), http10, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// maxUpHeaders bounds the response header lines the router accepts.
const maxUpHeaders = 100

// readHeader reads header lines up to the empty line, noting the framing
// headers (Content-Length, Transfer-Encoding, Connection) and the content
// type.
func (r *upResponse) readHeader(br *bufio.Reader) error {
	for {
		line, err := readLine(br)
		if err != nil {
			return err
		}
		if len(line) == 0 {
			if r.chunked {
				r.Length = -1 // chunked framing wins over a Content-Length (RFC 9112 §6.3)
			}
			return nil
		}
		if len(r.Header) >= maxUpHeaders {
			return fmt.Errorf("engine sent over %d response headers", maxUpHeaders)
		}
		i := bytes.IndexByte(line, ':')
		if i <= 0 {
			return fmt.Errorf("engine sent a malformed header line %q", truncate(line, 64))
		}
		key := line[:i]
		val := bytes.TrimSpace(line[i+1:])
		switch {
		case asciiEqualFold(key, "content-length"):
			n, err := strconv.ParseInt(string(val), 10, 64)
			if err != nil || n < 0 || (r.Length >= 0 && n != r.Length) {
				return fmt.Errorf("engine sent a bad Content-Length %q", truncate(val, 32))
			}
			r.Length = n
		case asciiEqualFold(key, "transfer-encoding"):
			if !asciiEqualFold(val, "chunked") {
				return fmt.Errorf("engine sent an unsupported Transfer-Encoding %q", truncate(val, 32))
			}
			r.chunked = true
			continue
		case asciiEqualFold(key, "connection"):
			if asciiContainsFold(val, "close") {
				r.close = true
			} else if asciiContainsFold(val, "keep-alive") {
				r.close = false
			}
			continue
		case asciiEqualFold(key, "keep-alive"):
			continue
		case asciiEqualFold(key, "content-type"):
			r.SSE = len(val) >= 17 && asciiEqualFold(val[:17], "text/event-stream")
		}
		r.Header = append(r.Header, upHeader{key: http.CanonicalHeaderKey(string(key)), value: string(val)})
	}
}

func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

func asciiContainsFold(b []byte, s string) bool {
	for i := 0; i+len(s) <= len(b); i++ {
		if asciiEqualFold(b[i:i+len(s)], s) {
			return true
		}
	}
	return false
}

// Read reads the body; io.EOF at its end, after which the connection is
// back in the pool (or closed when it cannot be reused).
func (r *upResponse) Read(p []byte) (int, error) {
	if r.done {
		return 0, io.EOF
	}
	if r.conn == nil {
		return 0, net.ErrClosed
	}
	// Pushing the deadline back costs a timer update; doing it at most every
	// idle/16 keeps the bound within 1/16 of IdleTimeout.
	if now := time.Now(); now.Sub(r.dlAt) > r.idle/16 {
		_ = r.conn.SetReadDeadline(now.Add(r.idle))
		r.dlAt = now
	}
	var n int
	var err error
	if r.Length >= 0 {
		if int64(len(p)) > r.left {
			p = p[:r.left]
		}
		n, err = r.conn.br.Read(p)
		r.left -= int64(n)
		if r.left == 0 {
			r.done, err = true, nil
			r.finish(true)
			return n, io.EOF
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	} else {
		n, err = r.body.Read(p)
		if err == io.EOF {
			if r.chunked {
				// Trailer lines, then the empty line that ends the message.
				for {
					line, lerr := readLine(r.conn.br)
					if lerr != nil {
						r.finish(false)
						return n, lerr
					}
					if len(line) == 0 {
						break
					}
				}
				r.done = true
				r.finish(true)
				return n, io.EOF
			}
			r.done = true
			r.finish(false)
			return n, io.EOF
		}
	}
	if err != nil {
		r.finish(false)
	}
	return n, err
}

// Close ends the exchange; a body not read to its end costs the connection
// (closing it is also how an engine learns that the client went away).
func (r *upResponse) Close() error {
	if r.conn != nil {
		r.finish(r.done)
	}
	return nil
}

func (r *upResponse) finish(reusable bool) {
	c := r.conn
	if c == nil {
		return
	}
	r.conn = nil
	// stopCtx false: the context already ended and poisoned the deadline.
	if r.stopCtx() && reusable && !r.close {
		r.u.put(c)
		return
	}
	_ = c.Close()
}

// retryableConnErr: the engine closed a pooled connection under us.
func retryableConnErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
