package model

import (
	"context"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"strconv"
)

// digest returns a hash for the strongest digest f carries, primed as that
// digest needs, with the expected value and its name; nil if f has none.
func digest(f File) (hash.Hash, string, string) {
	switch {
	case f.SHA256 != "":
		return sha256.New(), f.SHA256, "sha256"
	case f.GitSHA1 != "":
		h := sha1.New()
		fmt.Fprintf(h, "blob %s\x00", strconv.FormatInt(f.Size, 10))
		return h, f.GitSHA1, "git blob sha1"
	case f.MD5 != "":
		return md5.New(), f.MD5, "md5"
	case f.CRC32C != "":
		return crc32.New(crc32.MakeTable(crc32.Castagnoli)), f.CRC32C, "crc32c"
	}
	return nil, "", ""
}

func check(h hash.Hash, want, kind string) error {
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("%s mismatch: got %s, want %s", kind, got, want)
	}
	return nil
}

// verify hashes a whole file at path against f.
func verify(path string, f File) error {
	fh, err := os.Open(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	st, err := fh.Stat()
	if err != nil {
		return err
	}
	if st.Size() != f.Size {
		return fmt.Errorf("size %d, want %d", st.Size(), f.Size)
	}
	h, want, kind := digest(f)
	if h == nil {
		return nil
	}
	if _, err := io.CopyBuffer(h, struct{ io.Reader }{fh}, make([]byte, 4<<20)); err != nil {
		return err
	}
	return check(h, want, kind)
}

// hasher hashes a file while it downloads: it follows the contiguous prefix
// of written bytes (read back from the page cache), so when the last part
// lands only the tail is left to hash instead of the whole file. Parts are
// fetched roughly in order, so the prefix advances steadily.
type hasher struct {
	kick   chan struct{}
	result chan error
	cancel context.CancelFunc
}

// startHasher runs until the prefix reaches f.Size or ctx ends. frontier
// reports the contiguous written prefix.
func startHasher(ctx context.Context, fh *os.File, f File, frontier func() int64) *hasher {
	h, want, kind := digest(f)
	if h == nil {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	hs := &hasher{kick: make(chan struct{}, 1), result: make(chan error, 1), cancel: cancel}
	go func() {
		buf := make([]byte, 4<<20)
		var pos int64
		for pos < f.Size {
			end := frontier()
			for pos < end {
				n := min(int64(len(buf)), end-pos)
				k, err := fh.ReadAt(buf[:n], pos)
				if k > 0 {
					h.Write(buf[:k])
					pos += int64(k)
				}
				if err != nil && !(err == io.EOF && int64(k) == n) {
					hs.result <- fmt.Errorf("read back for hashing: %w", err)
					return
				}
			}
			if pos >= f.Size {
				break
			}
			select {
			case <-ctx.Done():
				hs.result <- ctx.Err()
				return
			case <-hs.kick:
			}
		}
		hs.result <- check(h, want, kind)
	}()
	return hs
}

// poke tells the hasher that more bytes were written.
func (hs *hasher) poke() {
	if hs == nil {
		return
	}
	select {
	case hs.kick <- struct{}{}:
	default:
	}
}

// wait returns the verdict once every byte was hashed.
func (hs *hasher) wait() error {
	hs.poke()
	err := <-hs.result
	hs.cancel()
	return err
}

func (hs *hasher) stop() {
	if hs != nil {
		hs.cancel()
	}
}
