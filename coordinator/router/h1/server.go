package h1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Handler serves one fast-path request. body reads the request's body into
// a pooled buffer, valid until the handler returns; it returns
// ErrBodyTooLarge over Config.MaxBody. A handler that answers without
// reading the body (a refused key) costs the connection: it is closed once
// the answer is out, the unread body never read into memory.
type Handler func(w http.ResponseWriter, req *http.Request, body func() ([]byte, error))

// ErrBodyTooLarge is body's error for a request over Config.MaxBody.
var ErrBodyTooLarge = errors.New("request body over the limit")

// Config is a Server's behaviour; the zero value of each field has a default.
type Config struct {
	// Handler serves POSTs with a Content-Length to Paths over HTTP/1.1;
	// Fallback (a net/http handler) serves every other request, on the
	// connection it arrived on and every later request there.
	Handler  Handler
	Fallback http.Handler
	Paths    []string
	// Keep are the request headers (canonical names) the fast path keeps
	// for Handler; others are dropped.
	Keep []string
	// MaxBody bounds a fast-path body (default 64 MiB).
	MaxBody int64
	// HeadTimeout bounds the time from a request's first byte (or the
	// connection's accept) to the end of its head (default 10 s, as the
	// router's net/http server's ReadHeaderTimeout); IdleTimeout closes a
	// connection silent for that long between requests, and bounds every
	// wait for a client that stopped sending a body or reading an answer
	// (default 75 s, nginx's keepalive_timeout).
	HeadTimeout time.Duration
	IdleTimeout time.Duration
	// MaxConns caps open client connections; one over it is closed at once
	// (default 65536).
	MaxConns int
	// AfterShutdown runs once the requests in flight have finished.
	AfterShutdown func()
	Log           *slog.Logger
}

func (c *Config) defaults() {
	if c.MaxBody == 0 {
		c.MaxBody = 64 << 20
	}
	if c.HeadTimeout == 0 {
		c.HeadTimeout = 10 * time.Second
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 75 * time.Second
	}
	if c.MaxConns == 0 {
		c.MaxConns = 65536
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// Server serves HTTP/1.1 on a plain TCP listener. The requests that make up
// nearly all of a router's traffic, a POST of a JSON body with a
// Content-Length to one of a few paths, are parsed and answered here; the
// net/http server's per-request machinery (header maps both ways,
// response-header clone and sort, a background read per request) was most of
// the router's own CPU per short request (bench/README.md). The first
// request on a connection that is anything else (a GET, a chunked body,
// Expect, HTTP/1.0, a malformed head, a bare LF, two Host headers) hands that
// connection, with every byte already read, to an http.Server running
// Fallback, which keeps it: those requests get net/http's full behaviour and
// errors. What the fast path accepts is held to http.ReadRequest by
// FuzzServerMatchesNetHTTP.
type Server struct {
	cfg   Config
	ln    net.Listener
	http  *http.Server
	hand  *handoffListener
	paths map[string]string
	keep  []keepName
	open  atomic.Int64 // client connections open, fast path and handed over

	mu      sync.Mutex
	conns   map[*frontConn]bool // true while a request is in flight
	closing bool
	wg      sync.WaitGroup
}

// NewServer returns a Server on ln; Serve starts it.
func NewServer(ln net.Listener, cfg Config) *Server {
	cfg.defaults()
	s := &Server{cfg: cfg, ln: ln, conns: map[*frontConn]bool{}, paths: map[string]string{},
		hand: &handoffListener{addr: ln.Addr(), ch: make(chan net.Conn), done: make(chan struct{})}}
	for _, p := range cfg.Paths {
		s.paths[p] = p
	}
	for _, k := range cfg.Keep {
		s.keep = append(s.keep, keepName{strings.ToLower(k), http.CanonicalHeaderKey(k)})
	}
	s.http = &http.Server{Handler: deadlines(cfg.Fallback, cfg.IdleTimeout),
		ReadHeaderTimeout: cfg.HeadTimeout, IdleTimeout: cfg.IdleTimeout}
	return s
}

// Serve accepts connections until the listener closes.
func (s *Server) Serve() error {
	go func() { _ = s.http.Serve(s.hand) }()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return http.ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: wait, as net/http does.
			s.cfg.Log.Warn("router accept failed; retrying", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if s.open.Add(1) > int64(s.cfg.MaxConns) {
			s.open.Add(-1)
			_ = c.Close()
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
			_ = tc.SetKeepAlive(true)
		}
		fc := &frontConn{Conn: c, s: s}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			_ = fc.Close()
			continue
		}
		s.conns[fc] = false
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveConn(fc)
	}
}

// Shutdown stops accepting, closes idle connections, lets requests in
// flight finish (until ctx ends, then closes them too), and shuts the
// handed-over connections down through http.Server.Shutdown.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for c, busy := range s.conns {
		if !busy {
			_ = c.Close() // idle: between requests, so nothing is cut
		}
	}
	s.mu.Unlock()
	_ = s.ln.Close()
	s.hand.close()
	herr := s.http.Shutdown(ctx)
	if s.cfg.AfterShutdown != nil {
		defer s.cfg.AfterShutdown() // after the requests in flight
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return herr
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			_ = c.Close()
		}
		s.mu.Unlock()
		<-done
		return ctx.Err()
	}
}

// Close closes everything at once.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = s.Shutdown(ctx)
	return nil
}

// frontConn is a client connection; pending holds a byte the disconnect
// watcher read while a request was in flight (the start of the next one).
type frontConn struct {
	net.Conn
	s       *Server
	pending []byte
	rdAt    time.Time // when the read deadline was set to now+IdleTimeout; zero: it is something else
	closed  atomic.Bool
}

// Close closes the connection once, counting it out.
func (c *frontConn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.s.open.Add(-1)
	return c.Conn.Close()
}

// idleDeadline makes the read deadline IdleTimeout from now, moving it at
// most every IdleTimeout/16.
func (c *frontConn) idleDeadline() {
	idle := c.s.cfg.IdleTimeout
	if now := time.Now(); now.Sub(c.rdAt) > idle/16 {
		_ = c.SetReadDeadline(now.Add(idle))
		c.rdAt = now
	}
}

// setReadDeadline sets another read deadline.
func (c *frontConn) setReadDeadline(t time.Time) {
	_ = c.SetReadDeadline(t)
	c.rdAt = time.Time{}
}

func (c *frontConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// MaxHead is the largest request head parsed here; bigger ones (up to
// net/http's 1 MB) are handed over.
const MaxHead = 16 << 10

func (s *Server) setBusy(c *frontConn, busy bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns[c] = busy
	return !s.closing
}

func (s *Server) forget(c *frontConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

func (s *Server) serveConn(c *frontConn) {
	defer s.forget(c)
	br := bufio.NewReaderSize(c, MaxHead)
	w := &ResponseWriter{c: c, idle: s.cfg.IdleTimeout}
	// A new connection has HeadTimeout to send its first request, as
	// net/http gives; between requests it may stay silent for IdleTimeout.
	c.setReadDeadline(time.Now().Add(s.cfg.HeadTimeout))
	for first := true; ; first = false {
		if !first {
			c.idleDeadline()
		}
		if _, err := br.Peek(1); err != nil {
			_ = c.Close()
			return
		}
		if !s.setBusy(c, true) {
			_ = c.Close()
			return
		}
		// The head must be whole within HeadTimeout of its first byte.
		req, headLen, verdict := parseHead(br, s.paths, s.keep, func() { c.setReadDeadline(time.Now().Add(s.cfg.HeadTimeout)) })
		switch verdict {
		case headHandOff:
			s.handoff(c, br)
			return
		case headFailed:
			_ = c.Close() // timed out or gone mid-head: net/http closes too
			return
		}
		_, _ = br.Discard(headLen)
		keep, err := s.serveOne(c, br, w, req)
		if err != nil || !keep || !s.setBusy(c, false) {
			if err == nil {
				lingerClose(c)
			}
			_ = c.Close()
			return
		}
	}
}

// handoff gives the connection, bytes already buffered first, to the
// http.Server.
func (s *Server) handoff(c *frontConn, br *bufio.Reader) {
	c.setReadDeadline(time.Time{})
	buffered, _ := br.Peek(br.Buffered())
	hc := &replayConn{frontConn: c, r: io.MultiReader(bytes.NewReader(bytes.Clone(buffered)), c)}
	s.mu.Lock()
	delete(s.conns, c) // http.Server tracks it from here
	s.mu.Unlock()
	if !s.hand.give(hc) {
		_ = c.Close()
	}
}

type replayConn struct {
	*frontConn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// handoffListener feeds handed-over connections to http.Server.Serve.
type handoffListener struct {
	addr net.Addr
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) give(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *handoffListener) close()         { l.once.Do(func() { close(l.done) }) }
func (l *handoffListener) Close() error   { l.close(); return nil }
func (l *handoffListener) Addr() net.Addr { return l.addr }

// serveOne runs the handler and finishes the response. keep: the
// connection may carry another request.
func (s *Server) serveOne(c *frontConn, br *bufio.Reader, w *ResponseWriter, fr Request) (bool, error) {
	w.reset(fr.Close)
	// body's state, read by the disconnect watcher's timer goroutine too.
	const (
		unread = iota
		whole
		broken
	)
	var state atomic.Int32
	var bp *[]byte
	var t *time.Timer
	ctx, cancel := context.WithCancel(context.Background())
	watch := &disconnectWatch{c: c, br: br, cancel: cancel}
	body := func() ([]byte, error) {
		if !state.CompareAndSwap(unread, broken) {
			return nil, errors.New("body read twice")
		}
		if fr.Length > s.cfg.MaxBody {
			w.close = true
			return nil, ErrBodyTooLarge
		}
		bp = GetBuf(int(fr.Length))
		b := (*bp)[:fr.Length]
		if int64(br.Buffered()) < fr.Length {
			c.idleDeadline()
		}
		if _, err := io.ReadFull(br, b); err != nil {
			w.close = true
			return nil, err
		}
		state.Store(whole)
		// A client that leaves while the handler works cancels the request.
		// The watcher starts only when the request has run for watchAfter
		// past its body: the answers that come sooner do not pay for a
		// goroutine and a read.
		t = time.AfterFunc(watchAfter, watch.start)
		return b, nil
	}
	req := (&http.Request{Method: http.MethodPost, URL: &url.URL{Path: fr.Path}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: fr.Header, ContentLength: fr.Length, Host: fr.Host, RequestURI: fr.Path, Body: http.NoBody}).WithContext(ctx)
	s.cfg.Handler(w, req, body)
	if t != nil {
		t.Stop()
	}
	watch.stop()
	cancel()
	PutBuf(bp)
	if state.Load() != whole {
		w.close = true // the body is still on the wire (or broken): no next request
	}
	err := w.finish()
	return err == nil && !w.close && !w.broken, err
}

// lingerClose half-closes a connection and reads what the client still
// sends for a moment: closing with unread data makes the kernel send a
// reset, which can destroy the answer (a 413, a 401, a Connection: close
// answer) before the client reads it. net/http does the same.
func lingerClose(c *frontConn) {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	c.setReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, _ = io.CopyN(io.Discard, c.Conn, 64<<20)
}

// watchAfter is how long a request runs before the disconnect watcher starts.
const watchAfter = 20 * time.Millisecond

// disconnectWatch reads from the client while its request is in flight: an
// error or EOF means it left; a byte is the start of a pipelined request and
// is kept for the next parse. It is started only once the body was read
// (before that the bytes are the body's).
type disconnectWatch struct {
	c      *frontConn
	br     *bufio.Reader
	cancel context.CancelFunc
	mu     sync.Mutex
	on     bool
	ended  bool
	done   chan struct{}
}

func (d *disconnectWatch) start() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ended || d.br.Buffered() > 0 {
		return // over, or a pipelined request is already here
	}
	d.on = true
	d.done = make(chan struct{})
	d.c.setReadDeadline(time.Time{}) // a request may run for hours
	go func() {
		defer close(d.done)
		var b [1]byte
		n, err := d.c.Conn.Read(b[:])
		if n > 0 {
			d.c.pending = append(d.c.pending, b[0])
			return
		}
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			d.cancel()
		}
	}()
}

func (d *disconnectWatch) stop() {
	d.mu.Lock()
	d.ended = true
	on := d.on
	d.mu.Unlock()
	if on {
		_ = d.c.SetReadDeadline(aLongTimeAgo)
		<-d.done
		d.c.setReadDeadline(time.Time{})
	}
}

// Request is a parsed fast-path request head.
type Request struct {
	Path   string
	Host   string
	Length int64
	Close  bool
	Header http.Header
}

// keepName is a request header the fast path keeps: as matched, as stored.
type keepName struct{ lower, canonical string }

type headVerdict int

const (
	headOK      headVerdict = iota
	headHandOff             // not a fast-path request: net/http answers it
	headFailed              // the client went silent or away mid-head
)

// parseHead parses the request head in br's buffer without consuming it.
// Anything it does not accept exactly as http.ReadRequest would is handed
// over: a request line other than "POST <path> HTTP/1.1", a line ending in
// a bare LF, a header name that is not a token, a value with a control
// byte, a Content-Length that is not digits or appears twice, no Host or a
// second or invalid one, Transfer-Encoding, Expect, Upgrade, a Connection
// option other than close and keep-alive.
func parseHead(br *bufio.Reader, paths map[string]string, keep []keepName, waiting func()) (Request, int, headVerdict) {
	var head []byte
	for first := true; ; first = false {
		b, _ := br.Peek(br.Buffered())
		if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
			head = b[:i+4]
			break
		}
		if bareLF(b) || len(b) >= MaxHead {
			return Request{}, 0, headHandOff // net/http takes bare LF and big heads; so it answers
		}
		if first && waiting != nil {
			waiting()
		}
		if _, err := br.Peek(len(b) + 1); err != nil {
			if more, _ := br.Peek(br.Buffered()); len(more) > len(b) {
				continue // bytes came with the error: look at them first
			}
			return Request{}, 0, headFailed
		}
	}
	if bareLF(head) {
		return Request{}, 0, headHandOff
	}
	var fr Request
	line, rest, _ := bytes.Cut(head, []byte("\r\n"))
	m, line, ok1 := bytes.Cut(line, []byte(" "))
	target, proto, ok2 := bytes.Cut(line, []byte(" "))
	if !ok1 || !ok2 || string(m) != "POST" || string(proto) != "HTTP/1.1" {
		return fr, 0, headHandOff
	}
	p, ok := paths[string(target)]
	if !ok {
		return fr, 0, headHandOff
	}
	fr.Path = p
	fr.Length = -1
	fr.Header = make(http.Header, 8)
	hosts := 0
	for len(rest) > 2 {
		var hl []byte
		hl, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		i := bytes.IndexByte(hl, ':')
		if i <= 0 || !validToken(hl[:i]) {
			return fr, 0, headHandOff
		}
		k, v := hl[:i], bytes.Trim(hl[i+1:], " \t")
		if !validValue(v) {
			return fr, 0, headHandOff
		}
		switch {
		case asciiEqualFold(k, "content-length"):
			n, ok := parseLength(v)
			if !ok || fr.Length >= 0 {
				return fr, 0, headHandOff
			}
			fr.Length = n
		case asciiEqualFold(k, "host"):
			hosts++
			if hosts > 1 || !httpguts.ValidHostHeader(string(v)) {
				return fr, 0, headHandOff
			}
			fr.Host = string(v)
		case asciiEqualFold(k, "connection"):
			for _, o := range bytes.Split(v, []byte(",")) {
				o = bytes.Trim(o, " \t")
				switch {
				case asciiEqualFold(o, "close"):
					fr.Close = true
				case asciiEqualFold(o, "keep-alive"), len(o) == 0:
				default:
					return fr, 0, headHandOff // upgrade and the like
				}
			}
		case asciiEqualFold(k, "transfer-encoding"), asciiEqualFold(k, "expect"), asciiEqualFold(k, "upgrade"):
			return fr, 0, headHandOff
		default:
			for _, name := range keep {
				if asciiEqualFold(k, name.lower) {
					fr.Header[name.canonical] = append(fr.Header[name.canonical], string(v))
					break
				}
			}
		}
	}
	if hosts == 0 || fr.Length < 0 {
		return fr, 0, headHandOff
	}
	return fr, len(head), headOK
}

// bareLF: a line in b ends in LF without CR.
func bareLF(b []byte) bool {
	for i := bytes.IndexByte(b, '\n'); i >= 0; {
		if i == 0 || b[i-1] != '\r' {
			return true
		}
		j := bytes.IndexByte(b[i+1:], '\n')
		if j < 0 {
			return false
		}
		i += 1 + j
	}
	return false
}

// validToken: b is an RFC 9110 token (a header name).
func validToken[T string | []byte](b T) bool {
	if len(b) == 0 {
		return false
	}
	for i := 0; i < len(b); i++ {
		if !httpguts.IsTokenRune(rune(b[i])) {
			return false
		}
	}
	return true
}

// validValue: b is a header value without control bytes (HTAB allowed,
// obs-text allowed), as net/textproto requires.
func validValue(b []byte) bool {
	for _, c := range b {
		if (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// asciiEqualFold: b equals the lower-case s, ignoring ASCII case.
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

// deadlines bounds the waits of the handed-over connections' requests, which
// http.Server's ReadHeaderTimeout and IdleTimeout do not: a body that stops
// arriving, an answer the client stops reading. Each read or write pushes
// its deadline idle from now (at most every idle/16); the read deadline is
// lifted once the body is read, so a long stream after it is not cut. A
// request with a chunked body closes its connection after the answer.
func deadlines(h http.Handler, idle time.Duration) http.Handler {
	if h == nil {
		return http.NotFoundHandler()
	}
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		rc := http.NewResponseController(w)
		dw := &deadlineWriter{ResponseWriter: w, rc: rc, idle: idle}
		if req.Body != nil && req.Body != http.NoBody && req.ContentLength != 0 {
			_ = rc.SetReadDeadline(time.Now().Add(idle))
			// A shallow copy: net/http keeps looking at its own Body (an
			// unread Expect: 100-continue body must stay unread).
			r2 := new(http.Request)
			*r2 = *req
			r2.Body = &deadlineBody{ReadCloser: req.Body, rc: rc, idle: idle, at: time.Now()}
			req = r2
		}
		if len(req.TransferEncoding) > 0 {
			// It may have come with a Content-Length too (net/http drops
			// that header before a handler sees it): RFC 9112 §6.1 says
			// close the connection after answering such a request.
			w.Header().Set("Connection", "close")
		}
		h.ServeHTTP(dw, req)
	})
}

type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	idle time.Duration
	at   time.Time
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	if !b.done {
		if now := time.Now(); now.Sub(b.at) > b.idle/16 {
			_ = b.rc.SetReadDeadline(now.Add(b.idle))
			b.at = now
		}
	}
	n, err := b.ReadCloser.Read(p)
	if err != nil && !b.done {
		b.done = true
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

type deadlineWriter struct {
	http.ResponseWriter
	rc   *http.ResponseController
	idle time.Duration
	at   time.Time
}

func (w *deadlineWriter) Write(p []byte) (int, error) {
	if now := time.Now(); now.Sub(w.at) > w.idle/16 {
		_ = w.rc.SetWriteDeadline(now.Add(w.idle))
		w.at = now
	}
	return w.ResponseWriter.Write(p)
}

func (w *deadlineWriter) Flush()                      { _ = w.rc.Flush() }
func (w *deadlineWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
