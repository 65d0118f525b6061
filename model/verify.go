package model

import (
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

// verify hashes path with the strongest digest f carries.
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
	var h hash.Hash
	var want, kind string
	switch {
	case f.SHA256 != "":
		h, want, kind = sha256.New(), f.SHA256, "sha256"
	case f.GitSHA1 != "":
		h, want, kind = sha1.New(), f.GitSHA1, "git blob sha1"
		fmt.Fprintf(h, "blob %s\x00", strconv.FormatInt(f.Size, 10))
	case f.MD5 != "":
		h, want, kind = md5.New(), f.MD5, "md5"
	case f.CRC32C != "":
		h, want, kind = crc32.New(crc32.MakeTable(crc32.Castagnoli)), f.CRC32C, "crc32c"
	default:
		return nil
	}
	buf := make([]byte, 4<<20)
	if _, err := io.CopyBuffer(h, struct{ io.Reader }{fh}, buf); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("%s mismatch: got %s, want %s", kind, got, want)
	}
	return nil
}
