package h1

import (
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ResponseWriter is the http.ResponseWriter of fast-path requests. The head
// goes out with the first body bytes: with the handler's Content-Length if
// it set one; else a body that ends before any Flush gets a computed
// Content-Length (one write for an error or a small answer) and one that is
// flushed or grows past 64 KiB is sent chunked. 1xx, 204 and 304 answers
// carry neither a length nor a body, as net/http's. Abort ends the answer
// as broken: the connection is closed without a final chunk, so a client
// never takes a cut answer for a whole one.
type ResponseWriter struct {
	c           net.Conn
	idle        time.Duration
	h           http.Header
	status      int
	wroteHeader bool
	sent        bool  // the head is on its way
	chunked     bool  // chunked framing
	noBody      bool  // 1xx, 204, 304
	declared    int64 // the handler's Content-Length, -1 if none
	written     int64 // body bytes after the head
	close       bool  // Connection: close
	broken      bool  // the connection cannot carry another request
	aborted     bool
	body        []byte
	out         []byte
	werr        error
	dlAt        time.Time // when the write deadline was last pushed back
}

func (w *ResponseWriter) reset(close bool) {
	if w.h == nil {
		w.h = make(http.Header, 16)
	} else {
		clear(w.h)
	}
	w.status, w.wroteHeader, w.sent, w.chunked, w.noBody, w.close, w.broken, w.aborted, w.werr = 0, false, false, false, false, close, false, false, nil
	w.declared, w.written = -1, 0
	w.body, w.out = w.body[:0], w.out[:0]
}

// Header is the response's header map.
func (w *ResponseWriter) Header() http.Header { return w.h }

// WriteHeader sets the status (once).
func (w *ResponseWriter) WriteHeader(code int) {
	if w.wroteHeader {
		return
	}
	w.wroteHeader = true
	w.status = code
	w.noBody = code < 200 || code == 204 || code == 304
	if w.noBody {
		delete(w.h, "Content-Length")
		delete(w.h, "Transfer-Encoding")
		return
	}
	if v := w.h["Content-Length"]; len(v) == 1 {
		if n, ok := parseLength([]byte(v[0])); ok {
			w.declared = n
		} else {
			delete(w.h, "Content-Length")
		}
	} else {
		delete(w.h, "Content-Length")
	}
	delete(w.h, "Transfer-Encoding") // the framing is this writer's
}

// head appends the status line and headers; length >= 0 adds that
// Content-Length, -2 means chunked, -1 the handler's own.
func (w *ResponseWriter) head(length int64) {
	w.sent = true
	w.out = append(w.out, "HTTP/1.1 "...)
	w.out = strconv.AppendInt(w.out, int64(w.status), 10)
	w.out = append(w.out, ' ')
	w.out = append(w.out, http.StatusText(w.status)...)
	w.out = append(w.out, "\r\n"...)
	switch {
	case w.noBody:
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
		if !validToken(k) {
			continue // never a header the client would misread
		}
		for _, v := range vs {
			w.out = append(w.out, k...)
			w.out = append(w.out, ": "...)
			if strings.ContainsAny(v, "\r\n\x00") {
				v = strings.NewReplacer("\r", " ", "\n", " ", "\x00", " ").Replace(v) // never a header injection
			}
			w.out = append(w.out, v...)
			w.out = append(w.out, "\r\n"...)
		}
	}
	w.out = append(w.out, "\r\n"...)
}

// Write adds body bytes.
func (w *ResponseWriter) Write(p []byte) (int, error) {
	if w.werr != nil {
		return 0, w.werr
	}
	if !w.wroteHeader {
		w.WriteHeader(200)
	}
	if w.noBody {
		return 0, http.ErrBodyNotAllowed
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
func (w *ResponseWriter) add(p []byte) {
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

func (w *ResponseWriter) startChunked() {
	w.head(-2)
	b := w.body
	w.body = w.body[:0]
	w.add(b)
}

// Flush sends what is buffered (an SSE event).
func (w *ResponseWriter) Flush() {
	if !w.wroteHeader {
		w.WriteHeader(200)
	}
	if !w.sent {
		switch {
		case w.noBody:
			w.head(-1)
		case w.declared >= 0:
			w.head(-1)
			b := w.body
			w.body = w.body[:0]
			w.add(b)
		default:
			w.startChunked()
		}
	}
	w.send()
}

// Abort marks the answer broken: what was sent stays sent, nothing ends it,
// and the connection closes.
func (w *ResponseWriter) Abort() {
	w.aborted, w.broken = true, true
}

func (w *ResponseWriter) send() {
	if w.werr != nil || len(w.out) == 0 {
		return
	}
	// A client that stops reading is dropped after the idle timeout; the
	// deadline moves at most every idle/16 (a timer update per write is not free).
	if now := time.Now(); now.Sub(w.dlAt) > w.idle/16 {
		_ = w.c.SetWriteDeadline(now.Add(w.idle))
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
// engine's stream broke) or an aborted one leaves the connection unusable:
// it is closed, with no final chunk.
func (w *ResponseWriter) finish() error {
	if !w.wroteHeader {
		w.WriteHeader(200)
	}
	if w.aborted {
		if !w.sent {
			w.out = w.out[:0] // nothing went out: the client sees the connection close
		}
		w.send()
		return w.werr
	}
	switch {
	case !w.sent:
		b := w.body
		w.body = w.body[:0]
		switch {
		case w.noBody:
			w.head(-1)
		case w.declared >= 0:
			w.head(-1)
		default:
			w.head(int64(len(b)))
		}
		w.add(b)
	case w.chunked:
		w.out = append(w.out, "0\r\n\r\n"...)
	}
	if !w.noBody && !w.chunked && w.written != w.declared {
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
