package router

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Server serves the router on a plain TCP listener. The requests that make
// up nearly all of the traffic, a POST of a JSON body with a Content-Length
// to one of the proxied OpenAI endpoints over HTTP/1.1, are parsed and
// answered here; the net/http server's per-request machinery (header maps
// both ways, response-header clone and sort, a background read per request)
// was most of the router's own CPU per short request (bench/README.md). The
// first request on a connection that is anything else (GET /v1/models,
// /metrics, a chunked body, Expect, HTTP/1.0, a malformed head) hands that
// connection, with every byte already read, to an http.Server running
// Handler(), which keeps it: those requests get net/http's full behaviour.
type Server struct {
	r    *Router
	ln   net.Listener
	http *http.Server
	hand *handoffListener

	mu      sync.Mutex
	conns   map[*frontConn]bool // true while a request is in flight
	closing bool
	wg      sync.WaitGroup
}

// NewServer returns a Server for r on ln; Serve starts it.
func (r *Router) NewServer(ln net.Listener) *Server {
	s := &Server{r: r, ln: ln, conns: map[*frontConn]bool{},
		hand: &handoffListener{addr: ln.Addr(), ch: make(chan net.Conn), done: make(chan struct{})}}
	s.http = &http.Server{Handler: r.Handler(), ReadHeaderTimeout: 10 * time.Second}
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
			s.r.log.Warn("router accept failed; retrying", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
			_ = tc.SetKeepAlive(true)
		}
		fc := &frontConn{Conn: c}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			_ = c.Close()
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
	defer s.r.up.closeIdle() // after the requests in flight: they return theirs
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
	pending []byte
	rdAt    time.Time // when the read deadline was set to now+frontIdle; zero: it is something else
}

// idleDeadline makes the read deadline frontIdle from now, moving it at
// most every frontIdle/16.
func (c *frontConn) idleDeadline() {
	if now := time.Now(); now.Sub(c.rdAt) > frontIdle/16 {
		_ = c.SetReadDeadline(now.Add(frontIdle))
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

// frontIdle closes a client connection that sends nothing for this long
// between requests; frontHead bounds the time to send a request head.
const (
	frontIdle = 5 * time.Minute
	frontHead = 10 * time.Second
	// frontMaxHead is the largest request head parsed here; bigger ones
	// (up to net/http's 1 MB) are handed over.
	frontMaxHead = 16 << 10
)

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
	br := bufio.NewReaderSize(c, frontMaxHead)
	w := &frontWriter{c: c}
	for {
		c.idleDeadline()
		if _, err := br.Peek(1); err != nil {
			_ = c.Close()
			return
		}
		if !s.setBusy(c, true) {
			_ = c.Close()
			return
		}
		// The idle deadline also bounds the head, unless it has to be waited
		// for: then frontHead does (a client trickling a head).
		req, headLen, ok := parseFrontHead(br, func() { c.setReadDeadline(time.Now().Add(frontHead)) })
		if !ok {
			s.handoff(c, br)
			return
		}
		_, _ = br.Discard(headLen)
		keep, err := s.serveOne(c, br, w, req)
		if err != nil || !keep || !s.setBusy(c, false) {
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
	hc := &replayConn{Conn: c, r: io.MultiReader(bytes.NewReader(bytes.Clone(buffered)), c)}
	s.mu.Lock()
	delete(s.conns, c) // http.Server tracks it from here
	s.mu.Unlock()
	if !s.hand.give(hc) {
		_ = c.Close()
	}
}

type replayConn struct {
	net.Conn
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

// frontReq is a parsed fast-path request head.
type frontReq struct {
	path   string
	length int64
	close  bool
	header http.Header
}

// parseFrontHead parses the request head in br's buffer without consuming
// it. ok=false: not a fast-path request (or not one this parser accepts);
// the caller hands the connection over and net/http answers it.
func parseFrontHead(br *bufio.Reader, waiting func()) (frontReq, int, bool) {
	var head []byte
	for first := true; ; first = false {
		b, err := br.Peek(br.Buffered())
		if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
			head = b[:i+4]
			break
		}
		if err != nil || br.Buffered() >= frontMaxHead {
			return frontReq{}, 0, false
		}
		if first && waiting != nil {
			waiting()
		}
		if _, err := br.Peek(br.Buffered() + 1); err != nil {
			return frontReq{}, 0, false
		}
	}
	var fr frontReq
	line, rest, _ := bytes.Cut(head, []byte("\r\n"))
	m, line, ok1 := bytes.Cut(line, []byte(" "))
	target, proto, ok2 := bytes.Cut(line, []byte(" "))
	if !ok1 || !ok2 || string(m) != "POST" || string(proto) != "HTTP/1.1" {
		return fr, 0, false
	}
	switch string(target) {
	case "/v1/chat/completions":
		fr.path = "/v1/chat/completions"
	case "/v1/completions":
		fr.path = "/v1/completions"
	case "/v1/embeddings":
		fr.path = "/v1/embeddings"
	default:
		return fr, 0, false
	}
	fr.length = -1
	fr.header = make(http.Header, 8)
	host := false
	for len(rest) > 2 {
		var hl []byte
		hl, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		i := bytes.IndexByte(hl, ':')
		if i <= 0 || !validToken(hl[:i]) {
			return fr, 0, false
		}
		k, v := hl[:i], bytes.Trim(hl[i+1:], " \t")
		if !validValue(v) {
			return fr, 0, false
		}
		switch {
		case asciiEqualFold(k, "content-length"):
			if len(v) == 0 || len(v) > 18 || !allDigits(v) || fr.length >= 0 {
				return fr, 0, false
			}
			n, _ := strconv.ParseInt(string(v), 10, 64)
			fr.length = n
		case asciiEqualFold(k, "host"):
			host = true
		case asciiEqualFold(k, "connection"):
			if asciiContainsFold(v, "close") {
				fr.close = true
			} else if !asciiEqualFold(v, "keep-alive") {
				return fr, 0, false // upgrade and the like
			}
		case asciiEqualFold(k, "transfer-encoding"), asciiEqualFold(k, "expect"), asciiEqualFold(k, "upgrade"):
			return fr, 0, false
		default:
			for _, name := range frontHeaders {
				if asciiEqualFold(k, name.lower) {
					fr.header[name.canonical] = append(fr.header[name.canonical], string(v))
					break
				}
			}
		}
	}
	if !host || fr.length < 0 {
		return fr, 0, false
	}
	return fr, len(head), true
}

// frontHeaders are the request headers the router reads or passes on, as
// matched (lower case) and as stored (canonical, what hget looks up).
var frontHeaders = [...]struct{ lower, canonical string }{
	{"authorization", "Authorization"}, {"content-type", "Content-Type"}, {"accept", "Accept"},
	{"openai-organization", "Openai-Organization"}, {"x-request-id", "X-Request-Id"},
	{"routing-strategy", "Routing-Strategy"}, {"x-session-id", "X-Session-Id"},
}

func allDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func validToken(b []byte) bool {
	for _, c := range b {
		if c <= ' ' || c >= 0x7f || bytes.IndexByte([]byte(`"(),/:;<=>?@[\]{}`), c) >= 0 {
			return false
		}
	}
	return true
}

func validValue(b []byte) bool {
	for _, c := range b {
		if (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// serveOne reads the body, proxies the request and finishes the response.
// keep: the connection may carry another request.
func (s *Server) serveOne(c *frontConn, br *bufio.Reader, w *frontWriter, fr frontReq) (bool, error) {
	r := s.r
	w.reset(fr.close)
	if fr.length > r.cfg.MaxBody {
		w.Header().Set("Connection", "close")
		writeError(w, 413, "invalid_request_error", "", "", "request body over the "+strconv.FormatInt(r.cfg.MaxBody>>20, 10)+" MiB limit")
		err := w.finish()
		lingerClose(c)
		return false, err
	}
	bp := getBody(int(fr.length))
	body := (*bp)[:fr.length]
	if int64(br.Buffered()) < fr.length {
		c.idleDeadline()
	}
	if _, err := io.ReadFull(br, body); err != nil {
		putBody(bp)
		return false, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	// A client that leaves while the engine works cancels the request. The
	// watcher starts only when a request has run for watchAfter: the
	// answers that come sooner do not pay for a goroutine and a read.
	watch := &disconnectWatch{c: c, br: br, cancel: cancel}
	t := time.AfterFunc(watchAfter, watch.start)
	req := (&http.Request{Method: http.MethodPost, URL: &url.URL{Path: fr.path}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: fr.header, ContentLength: fr.length, Body: http.NoBody}).WithContext(ctx)
	r.serve(w, req, body)
	t.Stop()
	watch.stop()
	cancel()
	putBody(bp)
	err := w.finish()
	return err == nil && !fr.close && !w.broken, err
}

// lingerClose half-closes a connection whose request body was not read and
// reads what the client still sends for a moment: closing with unread data
// makes the kernel send a reset, which can destroy the answer (the 413)
// before the client reads it.
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
// is kept for the next parse.
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

// frontWriter is the http.ResponseWriter of fast-path requests. The head
// goes out with the first body bytes: with the handler's Content-Length if
// it set one; else a body that ends before any Flush gets a computed
// Content-Length (one write for an error or a small answer) and one that is
// flushed or grows past 64 KiB is sent chunked.
type frontWriter struct {
	c           net.Conn
	h           http.Header
	status      int
	wroteHeader bool
	sent        bool  // the head is on its way
	chunked     bool  // chunked framing
	declared    int64 // the handler's Content-Length, -1 if none
	written     int64 // body bytes after the head
	close       bool  // Connection: close
	broken      bool  // the connection cannot carry another request
	body        []byte
	out         []byte
	werr        error
	dlAt        time.Time // when the write deadline was last pushed back
}

func (w *frontWriter) reset(close bool) {
	if w.h == nil {
		w.h = make(http.Header, 16)
	} else {
		clear(w.h)
	}
	w.status, w.wroteHeader, w.sent, w.chunked, w.close, w.broken, w.werr = 0, false, false, false, close, false, nil
	w.declared, w.written = -1, 0
	w.body, w.out = w.body[:0], w.out[:0]
}

func (w *frontWriter) Header() http.Header { return w.h }

func (w *frontWriter) WriteHeader(code int) {
	if w.wroteHeader {
		return
	}
	w.wroteHeader = true
	w.status = code
	if v := w.h["Content-Length"]; len(v) == 1 {
		if n, err := strconv.ParseInt(v[0], 10, 64); err == nil && n >= 0 {
			w.declared = n
		} else {
			delete(w.h, "Content-Length")
		}
	}
}

// head appends the status line and headers; length >= 0 adds that
// Content-Length, -2 means chunked, -1 the handler's own.
func (w *frontWriter) head(length int64) {
	w.sent = true
	w.out = append(w.out, "HTTP/1.1 "...)
	w.out = strconv.AppendInt(w.out, int64(w.status), 10)
	w.out = append(w.out, ' ')
	w.out = append(w.out, http.StatusText(w.status)...)
	w.out = append(w.out, "\r\n"...)
	switch {
	case length == -2:
		w.chunked = true
		w.out = append(w.out, "Transfer-Encoding: chunked\r\n"...)
	case length >= 0:
		w.declared = length
		w.h["Content-Length"] = []string{strconv.FormatInt(length, 10)}
	}
	if _, ok := w.h["Date"]; !ok {
		w.out = append(w.out, "Date: "...)
		w.out = append(w.out, httpDate()...)
		w.out = append(w.out, "\r\n"...)
	}
	if w.close {
		w.out = append(w.out, "Connection: close\r\n"...)
	}
	for k, vs := range w.h {
		for _, v := range vs {
			w.out = append(w.out, k...)
			w.out = append(w.out, ": "...)
			if strings.ContainsAny(v, "\r\n") {
				v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v) // never a header injection
			}
			w.out = append(w.out, v...)
			w.out = append(w.out, "\r\n"...)
		}
	}
	w.out = append(w.out, "\r\n"...)
}

func (w *frontWriter) Write(p []byte) (int, error) {
	if w.werr != nil {
		return 0, w.werr
	}
	if !w.wroteHeader {
		w.WriteHeader(200)
	}
	if !w.sent {
		if w.declared < 0 {
			w.body = append(w.body, p...)
			if len(w.body) > 64<<10 {
				w.startChunked()
				w.send()
			}
			return len(p), w.werr
		}
		w.head(-1)
	}
	w.add(p)
	if len(w.out) >= 64<<10 {
		w.send()
	}
	return len(p), w.werr
}

// add appends body bytes in the response's framing.
func (w *frontWriter) add(p []byte) {
	if len(p) == 0 {
		return
	}
	w.written += int64(len(p))
	if w.chunked {
		w.out = strconv.AppendInt(w.out, int64(len(p)), 16)
		w.out = append(w.out, "\r\n"...)
		w.out = append(w.out, p...)
		w.out = append(w.out, "\r\n"...)
		return
	}
	if w.declared >= 0 && w.written > w.declared {
		over := w.written - w.declared
		p = p[:int64(len(p))-over]
		w.written = w.declared
	}
	w.out = append(w.out, p...)
}

func (w *frontWriter) startChunked() {
	w.head(-2)
	b := w.body
	w.body = w.body[:0]
	w.add(b)
}

// Flush sends what is buffered (an SSE event).
func (w *frontWriter) Flush() {
	if !w.wroteHeader {
		w.WriteHeader(200)
	}
	if !w.sent {
		if w.declared >= 0 {
			w.head(-1)
			b := w.body
			w.body = w.body[:0]
			w.add(b)
		} else {
			w.startChunked()
		}
	}
	w.send()
}

func (w *frontWriter) send() {
	if w.werr != nil || len(w.out) == 0 {
		return
	}
	// A client that stops reading is dropped after frontIdle; the deadline
	// moves at most every frontIdle/16 (a timer update per write is not free).
	if now := time.Now(); now.Sub(w.dlAt) > frontIdle/16 {
		_ = w.c.SetWriteDeadline(now.Add(frontIdle))
		w.dlAt = now
	}
	if _, err := w.c.Write(w.out); err != nil {
		w.werr, w.broken = err, true
	}
	w.out = w.out[:0]
	if cap(w.out) > 256<<10 {
		w.out = nil
	}
}

// finish ends the response. A body shorter than its declared length (the
// engine's stream broke) leaves the connection unusable: it is closed.
func (w *frontWriter) finish() error {
	if !w.wroteHeader {
		w.WriteHeader(200)
	}
	switch {
	case !w.sent:
		b := w.body
		w.body = w.body[:0]
		if w.declared >= 0 {
			w.head(-1)
		} else {
			w.head(int64(len(b)))
		}
		w.add(b)
	case w.chunked:
		w.out = append(w.out, "0\r\n\r\n"...)
	}
	if !w.chunked && w.written != w.declared {
		w.broken = true
	}
	w.send()
	return w.werr
}

var (
	dateMu   sync.Mutex
	dateSec  atomic.Int64
	dateText atomic.Value
)

// httpDate is the current time in HTTP format, formatted once a second.
func httpDate() string {
	now := time.Now()
	if s := now.Unix(); dateSec.Load() != s {
		dateMu.Lock()
		if dateSec.Load() != s {
			dateText.Store(now.UTC().Format(http.TimeFormat))
			dateSec.Store(s)
		}
		dateMu.Unlock()
	}
	return dateText.Load().(string)
}
