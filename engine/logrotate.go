package engine

import (
	"fmt"
	"io"
	"os"
)

// Log rotation defaults: 100 MiB per file, three old files kept.
const (
	DefaultLogMaxBytes = 100 << 20
	DefaultLogKeep     = 3
)

// RotateLog rotates path once it holds more than maxBytes: path.(keep-1) →
// path.keep, …, a copy of path → path.1, then path is truncated in place. The
// engine keeps writing to its open file descriptor (opened O_APPEND, so its
// next write lands at the new end), which is why rotation copies and
// truncates rather than renames: the writer is the engine or the containerd
// shim and may outlive the agent. Lines written between the copy and the
// truncation are lost, as with logrotate's copytruncate.
func RotateLog(path string, maxBytes int64, keep int) (bool, error) {
	if maxBytes <= 0 || keep <= 0 {
		return false, nil
	}
	st, err := os.Stat(path)
	if err != nil {
		if os.IsNotExist(err) {
			return false, nil
		}
		return false, err
	}
	if st.Size() <= maxBytes {
		return false, nil
	}
	_ = os.Remove(fmt.Sprintf("%s.%d", path, keep))
	for i := keep - 1; i >= 1; i-- {
		_ = os.Rename(fmt.Sprintf("%s.%d", path, i), fmt.Sprintf("%s.%d", path, i+1))
	}
	src, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer src.Close()
	dst, err := os.OpenFile(path+".1", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return false, err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return false, fmt.Errorf("rotate %s: %w", path, err)
	}
	if err := dst.Close(); err != nil {
		return false, err
	}
	return true, os.Truncate(path, 0)
}
