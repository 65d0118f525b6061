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
	"net/http/httputil"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Client is the router's HTTP/1.1 client to engines: pooled keep-alive
// connections per backend, a request written with one writev (head + body,
// the body never copied), the response read on the caller's goroutine.
// net/http's Transport hands every request between three goroutines (caller,
// writeLoop, readLoop) and builds header maps both ways; on a 2-core host that
// was most of the router's cost per short request (BenchmarkProxy).
//
// What it accepts is held to http.ReadResponse by FuzzClientMatchesNetHTTP:
// an answer it takes, net/http takes with the same status, headers and body.
// A connection goes back to the pool only when its answer ended exactly
// where its framing said and nothing else arrived: an engine that sends
// more than it declared (or anything unasked) costs that connection, never
// the next client's answer.
type Client struct {
	dial    net.Dialer
	maxIdle int           // pooled connections per backend
	idleFor time.Duration // pooled connections older than this are closed, not reused

	mu    sync.Mutex
	idle  map[string][]*conn
	sweep *time.Timer // pending sweep of expired connections; nil when none
}

// IdleFor stays under uvicorn's keep-alive timeout (5 s), which vLLM's
// OpenAI server uses: a connection the engine is about to close is not reused.
const IdleFor = 4 * time.Second

// NewClient returns a client with an empty pool.
func NewClient() *Client {
	return &Client{
		dial:    net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second},
		maxIdle: 1024,
		idleFor: IdleFor,
		idle:    map[string][]*conn{},
	}
}

type conn struct {
	net.Conn
	br   *bufio.Reader
	addr string
	last time.Time // when it went back to the pool
}

// get returns a pooled connection to addr (reused=true) or dials one.
func (u *Client) get(ctx context.Context, addr string) (*conn, bool, error) {
	now := time.Now()
	u.mu.Lock()
	for l := u.idle[addr]; len(l) > 0; l = u.idle[addr] {
		c := l[len(l)-1]
		u.idle[addr] = l[:len(l)-1]
		if now.Sub(c.last) < u.idleFor && c.quiet() {
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
	return &conn{Conn: nc, br: bufio.NewReaderSize(nc, 16<<10), addr: addr}, false, nil
}

// quiet: nothing arrived on an idle connection since its last answer ended,
// neither bytes nobody asked for nor the engine's close. One non-blocking
// peek at the socket (net/http's Transport learns the same from its
// background read loop).
func (c *conn) quiet() bool {
	if c.br.Buffered() > 0 {
		return false
	}
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	quiet := false
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		_, _, rerr := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		quiet = rerr == syscall.EAGAIN || rerr == syscall.EWOULDBLOCK
		return true // never wait for readiness
	})
	return err == nil && quiet
}

// put returns a connection whose response was read to its end.
func (u *Client) put(c *conn) {
	if c.br.Buffered() > 0 {
		_ = c.Close() // bytes past the answer's end: the engine's framing lied
		return
	}
	// Its deadline stays: IdleTimeout outlives the pool's idleFor, and the
	// next request sets a new one.
	c.last = time.Now()
	u.mu.Lock()
	if l := u.idle[c.addr]; len(l) < u.maxIdle {
		u.idle[c.addr] = append(l, c)
		if u.sweep == nil {
			u.sweep = time.AfterFunc(u.idleFor, u.sweepExpired)
		}
		u.mu.Unlock()
		return
	}
	u.mu.Unlock()
	_ = c.Close()
}

// sweepExpired closes expired pooled connections of every backend, so those
// of a backend that went away (no more requests to find them) do not linger;
// it runs again while any connection is pooled.
func (u *Client) sweepExpired() {
	now := time.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	u.sweep = nil
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
	if len(u.idle) > 0 {
		u.sweep = time.AfterFunc(u.idleFor/2, u.sweepExpired)
	}
}

// CloseIdle closes every pooled connection (the router is shutting down, tests).
func (u *Client) CloseIdle() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.sweep != nil {
		u.sweep.Stop()
		u.sweep = nil
	}
	for a, l := range u.idle {
		for _, c := range l {
			_ = c.Close()
		}
		delete(u.idle, a)
	}
}

// Idle is how many connections to addr are pooled now (tests, metrics).
func (u *Client) Idle(addr string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.idle[addr])
}

// Header is one header line: a request header to send, or a response header
// as the engine sent it (name canonicalised).
type Header struct{ Key, Value string }

// Response is an engine's answer; Read reads the rest of its body.
type Response struct {
	Status int
	Header []Header // hop-by-hop and framing headers removed, Content-Length kept for whole bodies
	SSE    bool
	Length int64 // -1: chunked or until close

	chunked bool
	close   bool // the connection cannot be reused after this response
	lengths int  // Content-Length lines seen

	conn    *conn
	u       *Client
	body    io.Reader
	left    int64 // for Length >= 0
	done    bool  // body read to its end
	broken  error // the body ended before its framing said
	stopCtx func() bool
	idle    time.Duration
	dlAt    time.Time  // when the read deadline was last pushed back
	writing chan error // the body's writer, for a large body written beside the read
}

// ErrBeforeResponse wraps a failure before any byte of the response arrived;
// ReusedConn says the connection came from the pool (the engine may have
// closed it meanwhile, so one fresh attempt is safe).
type ErrBeforeResponse struct {
	Err        error
	ReusedConn bool
}

func (e *ErrBeforeResponse) Error() string { return e.Err.Error() }
func (e *ErrBeforeResponse) Unwrap() error { return e.Err }

// ErrTruncated is the error of a Read whose body ended before its framing
// said it would (the engine closed mid-answer, or a chunk was malformed):
// the client's connection must be aborted, never ended as if complete.
var ErrTruncated = errors.New("the engine's answer ended before its declared end")

// aLongTimeAgo is a deadline that makes blocked I/O return at once.
var aLongTimeAgo = time.Unix(1, 0)

// headBufs recycles request-head buffers.
var headBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// inlineBody is the largest body written before the response is read; a
// larger one is written beside the read, so an engine that answers early
// (a 413, a 400 before reading it all) is heard at once.
const inlineBody = 64 << 10

// maxInformational bounds the 1xx answers skipped before the real one.
const maxInformational = 5

// Do sends one request (path with its query, the headers to pass, the body)
// and reads the response head. idle bounds every wait for the engine (write
// or read); ctx ending aborts the exchange at once. A connection from the
// pool that fails before the response begins is retried once on a new one.
func (u *Client) Do(ctx context.Context, addr, method, path string, hdr []Header, body []byte, idle time.Duration) (*Response, error) {
	resp, err := u.try(ctx, addr, method, path, hdr, body, idle)
	var eb *ErrBeforeResponse
	if err != nil && errors.As(err, &eb) && eb.ReusedConn && ctx.Err() == nil && RetryableConnErr(eb.Err) {
		resp, err = u.try(ctx, addr, method, path, hdr, body, idle)
	}
	return resp, err
}

func (u *Client) try(ctx context.Context, addr, method, path string, hdr []Header, body []byte, idle time.Duration) (*Response, error) {
	c, reused, err := u.get(ctx, addr)
	if err != nil {
		return nil, &ErrBeforeResponse{Err: err}
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(aLongTimeAgo) })
	var writing chan error
	fail := func(err error) (*Response, error) {
		stop()
		_ = c.Close()
		if writing != nil {
			if werr := <-writing; werr != nil && !isResponseErr(err) {
				err = werr
			}
		}
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, &ErrBeforeResponse{Err: err, ReusedConn: reused}
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
		h = append(h, kv.Key...)
		h = append(h, ": "...)
		h = append(h, kv.Value...)
		h = append(h, "\r\n"...)
	}
	h = append(h, "\r\n"...)
	now := time.Now()
	_ = c.SetDeadline(now.Add(idle))
	var werr error
	switch {
	case len(body) <= 4<<10:
		// Small bodies ride in the head's buffer: one plain write.
		h = append(h, body...)
		_, werr = c.Write(h)
	case len(body) <= inlineBody:
		bufs := net.Buffers{h, body}
		_, werr = bufs.WriteTo(c.Conn)
	default:
		writing = make(chan error, 1)
		head := bytes.Clone(h)
		go func() {
			bufs := net.Buffers{head, body}
			_, err := bufs.WriteTo(c.Conn)
			writing <- err
		}()
	}
	*hp = h
	headBufs.Put(hp)
	// A failed write may still have an answer behind it (the engine refused
	// the request and closed): it is read before the write error counts.
	r := &Response{conn: c, u: u, stopCtx: stop, idle: idle, dlAt: now}
	if err := r.readHead(c.br, method); err != nil {
		if werr != nil && !isResponseErr(err) {
			err = werr
		}
		return fail(err)
	}
	if werr != nil {
		r.close = true
	}
	if writing != nil {
		select {
		case err := <-writing:
			if err != nil {
				r.close = true
			}
		default:
			// Answered before the body was all sent: this connection ends
			// with the answer (the engine will not read the rest).
			r.close = true
			r.writing = writing
		}
	}
	return r, nil
}

// isResponseErr: err is about what the engine sent, not the connection.
func isResponseErr(err error) bool {
	var pe *ProtocolError
	return errors.As(err, &pe)
}

// ProtocolError is an answer that breaks HTTP/1.1's rules.
type ProtocolError struct{ Msg string }

func (e *ProtocolError) Error() string { return e.Msg }

func protoErr(format string, a ...any) error { return &ProtocolError{Msg: fmt.Sprintf(format, a...)} }

// readHead reads the status line and headers (skipping 100 Continue and
// 103 Early Hints) and sets the body's framing as RFC 9112 §6.3 and
// net/http's ReadResponse do.
func (r *Response) readHead(br *bufio.Reader, method string) error {
	http10 := false
	for n := 0; ; n++ {
		line, err := readLine(br)
		if err != nil {
			return err
		}
		st, h10, err := parseStatusLine(line)
		if err != nil {
			return err
		}
		r.Status, http10, r.close, r.Length, r.chunked, r.lengths = st, h10, h10, -1, false, 0
		r.Header = r.Header[:0]
		if err := r.readHeader(br, http10); err != nil {
			return err
		}
		if st == http.StatusSwitchingProtocols {
			return protoErr("engine switched protocols (101) unasked")
		}
		if st >= 100 && st < 200 {
			if n >= maxInformational {
				return protoErr("engine sent over %d informational (1xx) answers", maxInformational)
			}
			continue // 100 Continue, 103 Early Hints: the answer follows
		}
		break
	}
	if r.chunked && http10 {
		r.chunked = false // HTTP/1.0 has no chunked framing: net/http ignores the header
	}
	noBody := r.Status == 204 || r.Status == 304 || method == http.MethodHead
	if r.chunked || noBody {
		// An intermediary removes a Content-Length that chunked framing
		// overrides (RFC 9112 §6.3): passing both on lets a client take the
		// first bytes of the chunked body as the whole answer.
		r.dropHeader("Content-Length")
	}
	switch {
	case noBody:
		r.Length, r.left, r.chunked = 0, 0, false
	case r.chunked:
		r.Length = -1
		r.body = httputil.NewChunkedReader(br)
	case r.Length >= 0:
		r.left = r.Length
	default:
		r.close = true // body runs until the engine closes the connection
		r.body = br
	}
	if r.Length == 0 {
		r.done = true
	}
	return nil
}

func (r *Response) dropHeader(key string) {
	kept := r.Header[:0]
	for _, h := range r.Header {
		if h.Key != key {
			kept = append(kept, h)
		}
	}
	r.Header = kept
}

// readLine reads one CRLF- or LF-terminated line without the terminator
// (net/textproto takes both). The slice is valid until the next read from br.
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		return nil, protoErr("engine sent a response header line over 16 KiB")
	}
	if err != nil {
		if err == io.EOF && len(line) == 0 {
			return nil, io.ErrUnexpectedEOF
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
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
		return 0, false, protoErr("engine sent a malformed status line %q", truncate(line, 64))
	}
	if line[7] == '0' {
		http10 = true
	} else if line[7] != '1' {
		return 0, false, protoErr("engine sent a malformed status line %q", truncate(line, 64))
	}
	c := line[9:12]
	if c[0] < '1' || c[0] > '5' || c[1] < '0' || c[1] > '9' || c[2] < '0' || c[2] > '9' || (len(line) > 12 && line[12] != ' ') {
		return 0, false, protoErr("engine sent a malformed status line %q", truncate(line, 64))
	}
	return int(c[0]-'0')*100 + int(c[1]-'0')*10 + int(c[2]-'0'), http10, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// maxHeaders bounds the response header lines the router accepts.
const maxHeaders = 100

// readHeader reads header lines up to the empty line, noting the framing
// headers (Content-Length, Transfer-Encoding, Connection) and the content
// type. Names must be tokens and values free of control bytes, as
// net/textproto requires: a name with a CR, NUL or space would otherwise
// reach the client verbatim.
func (r *Response) readHeader(br *bufio.Reader, http10 bool) error {
	te := 0
	for {
		line, err := readLine(br)
		if err != nil {
			return err
		}
		if len(line) == 0 {
			if te > 1 {
				return protoErr("engine sent %d Transfer-Encoding headers", te)
			}
			return nil
		}
		if len(r.Header) >= maxHeaders {
			return protoErr("engine sent over %d response headers", maxHeaders)
		}
		i := bytes.IndexByte(line, ':')
		if i <= 0 || !validToken(line[:i]) {
			return protoErr("engine sent a malformed header line %q", truncate(line, 64))
		}
		key := line[:i]
		val := bytes.Trim(line[i+1:], " \t")
		if !validValue(val) {
			return protoErr("engine sent a malformed header line %q", truncate(line, 64))
		}
		switch {
		case asciiEqualFold(key, "content-length"):
			n, ok := parseLength(val)
			if !ok || (r.lengths > 0 && n != r.Length) {
				return protoErr("engine sent a bad Content-Length %q", truncate(val, 32))
			}
			r.lengths++
			if r.lengths > 1 {
				continue // equal duplicates are one (net/http)
			}
			r.Length = n
		case asciiEqualFold(key, "transfer-encoding"):
			te++
			if http10 {
				continue
			}
			if !asciiEqualFold(val, "chunked") {
				return protoErr("engine sent an unsupported Transfer-Encoding %q", truncate(val, 32))
			}
			r.chunked = true
			continue
		case asciiEqualFold(key, "connection"):
			if asciiContainsFold(val, "close") {
				r.close = true
			} else if asciiContainsFold(val, "keep-alive") && !http10 {
				r.close = false
			}
			continue
		case asciiEqualFold(key, "keep-alive"), asciiEqualFold(key, "upgrade"), asciiEqualFold(key, "proxy-connection"), asciiEqualFold(key, "te"), asciiEqualFold(key, "trailer"):
			continue // hop-by-hop
		case asciiEqualFold(key, "content-type"):
			r.SSE = len(val) >= 17 && asciiEqualFold(val[:17], "text/event-stream")
		}
		r.Header = append(r.Header, Header{Key: http.CanonicalHeaderKey(string(key)), Value: string(val)})
	}
}

// parseLength reads a Content-Length: digits only (no sign, no spaces
// inside), at most 18 of them.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// Read reads the body; io.EOF at its end, after which the connection is
// back in the pool (or closed when it cannot be reused). A body that ends
// before its framing says returns ErrTruncated (wrapping the cause).
func (r *Response) Read(p []byte) (int, error) {
	if r.done {
		return 0, io.EOF
	}
	if r.broken != nil {
		return 0, r.broken
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
			r.done = true
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
				if terr := readTrailer(r.conn.br); terr != nil {
					return n, r.breakOff(terr)
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
		return n, r.breakOff(err)
	}
	return n, nil
}

// maxTrailer bounds a chunked body's trailer section (net/http's reader
// gives up on one that does not end within its 4 KiB buffer).
const maxTrailer = 4 << 10

// readTrailer reads the trailer lines up to the empty one; each must be a
// CRLF-ended header line (the trailers are not passed on).
func readTrailer(br *bufio.Reader) error {
	size := 0
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if len(line) < 2 || line[len(line)-2] != '\r' {
			return protoErr("engine ended a trailer line with a bare LF")
		}
		line = line[:len(line)-2]
		if len(line) == 0 {
			return nil
		}
		size += len(line) + 2
		i := bytes.IndexByte(line, ':')
		if size > maxTrailer || i <= 0 || !validToken(line[:i]) || !validValue(bytes.Trim(line[i+1:], " \t")) {
			return protoErr("engine sent a malformed trailer %q", truncate(line, 64))
		}
	}
}

// breakOff ends a body that stopped short: the connection is closed and
// every later Read says why.
func (r *Response) breakOff(err error) error {
	r.finish(false)
	r.broken = fmt.Errorf("%w: %w", ErrTruncated, err)
	return r.broken
}

// Close ends the exchange; a body not read to its end costs the connection
// (closing it is also how an engine learns that the client went away).
func (r *Response) Close() error {
	if r.conn != nil {
		r.finish(r.done)
	}
	return nil
}

func (r *Response) finish(reusable bool) {
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
	if r.writing != nil {
		<-r.writing // the closed connection ends the body's write
		r.writing = nil
	}
}

// RetryableConnErr: the engine closed a pooled connection under us.
func RetryableConnErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
