package h1

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/require"
)

func TestReadBody(t *testing.T) {
	for _, n := range []int{0, 1, 4095, 4096, 4097, 200 << 10, 5 << 20} {
		data := bytes.Repeat([]byte{'a', 'b', 'c'}, n/3+1)[:n]
		for _, hint := range []int64{int64(n), -1, 10, int64(n) + 100} {
			for name, r := range map[string]io.Reader{
				"whole":   bytes.NewReader(data),
				"onebyte": iotest.OneByteReader(bytes.NewReader(data[:min(n, 9000)])),
			} {
				want := data
				if name == "onebyte" {
					want = data[:min(n, 9000)]
				}
				b, bp, err := ReadBody(r, hint, 64<<20)
				require.NoError(t, err)
				require.True(t, bytes.Equal(want, b), "n=%d hint=%d %s: got %d bytes", n, hint, name, len(b))
				PutBuf(bp)
			}
		}
	}
	// Over the limit: the MaxBytesReader error comes back.
	rec := httptest.NewRecorder()
	_, bp, err := ReadBody(http.MaxBytesReader(rec, io.NopCloser(bytes.NewReader(make([]byte, 10000))), 5000), 10000, 5000)
	var tooBig *http.MaxBytesError
	require.ErrorAs(t, err, &tooBig)
	PutBuf(bp)
	// A reader failing midway returns its error.
	b, bp, err := ReadBody(iotest.TimeoutReader(bytes.NewReader(make([]byte, 100))), -1, 1<<20)
	require.ErrorIs(t, err, iotest.ErrTimeout)
	require.Len(t, b, 100)
	PutBuf(bp)
	_, _, err = ReadBody(iotest.ErrReader(io.ErrUnexpectedEOF), -1, 1<<20)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
}

func TestBodyClass(t *testing.T) {
	for n, c := range map[int]int{0: 12, 4096: 12, 4097: 13, 200 << 10: 18, 4 << 20: 22, 5 << 20: 22} {
		require.Equal(t, c, bodyClass(n), "n=%d", n)
	}
	require.Equal(t, 5<<20, cap(*GetBuf(5 << 20)), "over the largest class: exact size, not pooled")
}
