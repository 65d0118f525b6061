package model

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
)

// memSource serves files from memory with injectable faults.
type memSource struct {
	name  string
	files map[string][]byte
	// listed overrides digests; nil means MD5 of the content.
	noDigest bool

	read      atomic.Int64 // bytes handed out
	reads     atomic.Int64
	mu        sync.Mutex
	failEvery int   // every Nth Read fails after half its bytes
	corrupt   int   // the next N reads have one byte flipped
	cutAfter  int64 // after this many bytes in total, reads block until ctx ends
}

func newMem(name string, sizes map[string]int) *memSource {
	m := &memSource{name: name, files: map[string][]byte{}}
	r := rand.New(rand.NewPCG(1, 2))
	for n, size := range sizes {
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		m.files[n] = b
	}
	return m
}

func (m *memSource) String() string { return m.name }

func (m *memSource) List(ctx context.Context) ([]File, error) {
	var out []File
	for n, b := range m.files {
		f := File{Name: n, Size: int64(len(b))}
		sum := md5.Sum(b)
		f.ETag = hex.EncodeToString(sum[:])
		if !m.noDigest {
			f.MD5 = f.ETag
		}
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

type faultReader struct {
	ctx  context.Context
	r    io.Reader
	m    *memSource
	fail int64 // bytes before an error; -1 never
}

func (f *faultReader) Read(p []byte) (int, error) {
	if f.fail == 0 {
		return 0, errors.New("connection reset by peer (injected)")
	}
	if f.fail > 0 && int64(len(p)) > f.fail {
		p = p[:f.fail]
	}
	if c := f.m.cutAfter; c > 0 && f.m.read.Load() >= c {
		<-f.ctx.Done()
		return 0, f.ctx.Err()
	}
	n, err := f.r.Read(p)
	f.m.read.Add(int64(n))
	if f.fail > 0 {
		f.fail -= int64(n)
	}
	return n, err
}

func (f *faultReader) Close() error { return nil }

func (m *memSource) Read(ctx context.Context, fl File, off, n int64) (io.ReadCloser, error) {
	b := m.files[fl.Name]
	k := m.reads.Add(1)
	data := b[off : off+n]
	m.mu.Lock()
	if m.corrupt > 0 {
		m.corrupt--
		data = bytes.Clone(data)
		data[len(data)/2] ^= 0xff
	}
	fail := int64(-1)
	if m.failEvery > 0 && k%int64(m.failEvery) == 0 {
		fail = n / 2
	}
	m.mu.Unlock()
	return &faultReader{ctx: ctx, r: bytes.NewReader(data), m: m, fail: fail}, nil
}

func stringsReader(s string) io.Reader { return bytes.NewReader([]byte(s)) }

func md5b64(b []byte) string {
	s := md5.Sum(b)
	return base64.StdEncoding.EncodeToString(s[:])
}
