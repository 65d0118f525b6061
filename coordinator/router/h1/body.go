package h1

import (
	"io"
	"sync"
)

// bodyPools recycle request-body buffers by power-of-two size class, 4 KiB
// to 4 MiB: a fresh 200 KB buffer per request (allocated, zeroed, collected)
// was a quarter of the router's cost for long prompts (BenchmarkProxy/200KB).
var bodyPools [11]sync.Pool

const (
	minBodyClass = 12 // 4 KiB
	maxBodyClass = minBodyClass + len(bodyPools) - 1
)

func bodyClass(n int) int {
	c := minBodyClass
	for c < maxBodyClass && 1<<c < n {
		c++
	}
	return c
}

// ReadBody reads a whole request body into a pooled buffer; hint is the
// declared length (-1 when chunked). A declared length is read into a buffer
// of that size (not one byte more: that would double the size class of a
// power-of-two body). The buffer goes back with PutBuf once nothing refers
// to the body.
func ReadBody(r io.Reader, hint, limit int64) ([]byte, *[]byte, error) {
	if hint >= 0 && hint <= limit {
		bp := GetBuf(int(hint))
		b := (*bp)[:hint]
		n := 0
		for n < len(b) {
			m, err := r.Read(b[n:])
			n += m
			if err == io.EOF {
				*bp = b[:n] // the reader ended first: it, not the hint, is right
				return *bp, bp, nil
			}
			if err != nil {
				*bp = b[:n]
				return *bp, bp, err
			}
		}
		*bp = b
		// The declared length was all: the reader should end here.
		var one [1]byte
		m, err := r.Read(one[:])
		if m > 0 {
			// More than declared (not net/http's body, which stops at its
			// Content-Length): read on, growing the buffer.
			*bp = append(*bp, one[0])
			return readRest(r, bp)
		}
		if err != nil && err != io.EOF {
			return *bp, bp, err
		}
		return *bp, bp, nil
	}
	bp := GetBuf(4 << 10)
	*bp = (*bp)[:0]
	return readRest(r, bp)
}

func readRest(r io.Reader, bp *[]byte) ([]byte, *[]byte, error) {
	b := *bp
	for {
		if len(b) == cap(b) {
			nb := GetBuf(2 * cap(b))
			*nb = append((*nb)[:0], b...)
			*bp = b
			PutBuf(bp)
			bp, b = nb, *nb
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			*bp = b
			return b, bp, nil
		}
		if err != nil {
			*bp = b
			return b, bp, err
		}
	}
}

// GetBuf returns a pooled buffer of capacity at least n, length 0.
func GetBuf(n int) *[]byte {
	c := bodyClass(n)
	if 1<<c < n {
		b := make([]byte, 0, n) // over the largest class: not pooled
		return &b
	}
	if v := bodyPools[c-minBodyClass].Get(); v != nil {
		return v.(*[]byte)
	}
	b := make([]byte, 0, 1<<c)
	return &b
}

// PutBuf returns a buffer from GetBuf or ReadBody (nil is ignored).
func PutBuf(bp *[]byte) {
	if bp == nil {
		return
	}
	c := cap(*bp)
	if c < 1<<minBodyClass || c > 1<<maxBodyClass || c&(c-1) != 0 {
		return
	}
	*bp = (*bp)[:0]
	bodyPools[bodyClass(c)-minBodyClass].Put(bp)
}
