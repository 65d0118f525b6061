package model

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	stateDir     = ".shoal"
	partialDir   = stateDir + "/partial"
	manifestFile = stateDir + "/manifest.json"
	completeFile = stateDir + "/complete"
	lockFile     = stateDir + "/lock"
)

// Manifest records what a pull selected, and when it completed.
type Manifest struct {
	Source string `json:"source"`
	// Boot is the kernel boot id when the pull ran: until the pull completes
	// (and syncs), its files are trusted without re-hashing only within the
	// same boot, since a power loss can drop unsynced page-cache data.
	Boot      string    `json:"boot,omitempty"`
	Files     []File    `json:"files"`
	Bytes     int64     `json:"bytes"`
	Completed time.Time `json:"completed,omitempty"`
}

// partState is the progress record beside a partial file: bytes written from
// the start of each chunk. Written data is in the page cache before it is
// counted, so a killed process loses nothing; a record from another boot is
// not trusted (the cache may have died unsynced), unless the boot id is
// unknown, in which case the data is synced before each record.
type partState struct {
	Boot  string  `json:"boot,omitempty"`
	ETag  string  `json:"etag"`
	Size  int64   `json:"size"`
	Chunk int64   `json:"chunk"`
	Done  []int64 `json:"done"`
}

// writeJSONAtomic replaces path with v's JSON; durable also syncs it first.
func writeJSONAtomic(path string, v any, durable bool) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if durable {
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// bootID identifies this boot of the kernel ("" where unknown).
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// syncFS makes everything written under dir durable before the model is
// marked complete: one syncfs instead of an fsync per file on the hot path.
func syncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return unix.Syncfs(int(d.Fd()))
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// ReadManifest returns the manifest of a completed pull in dir, or an error
// saying why dir does not hold one.
func ReadManifest(dir string) (*Manifest, error) {
	var m Manifest
	if err := readJSON(filepath.Join(dir, completeFile), &m); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s holds no completed pull", dir)
		}
		return nil, fmt.Errorf("%s: completion record unreadable: %w", dir, err)
	}
	return &m, nil
}

// Complete says whether dir holds a completed pull of source whose files are
// all present with their sizes.
func Complete(dir, source string) bool {
	m, err := ReadManifest(dir)
	if err != nil || m.Source != source {
		return false
	}
	return checkSizes(dir, m.Files) == nil
}

func checkSizes(dir string, files []File) error {
	for _, f := range files {
		st, err := os.Stat(filepath.Join(dir, filepath.FromSlash(f.Name)))
		if err != nil {
			return fmt.Errorf("%s is missing", f.Name)
		}
		if st.Size() != f.Size {
			return fmt.Errorf("%s is %d bytes, want %d", f.Name, st.Size(), f.Size)
		}
	}
	return nil
}

// Check decides whether a local or shared directory can be given to an
// engine: a completed pull must still have every file; otherwise every shard
// named by a *.safetensors.index.json must exist and no weight file may be
// empty. Errors say what is missing.
func Check(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("model directory: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("model path %s is not a directory", dir)
	}
	if m, err := ReadManifest(dir); err == nil {
		if err := checkSizes(dir, m.Files); err != nil {
			return fmt.Errorf("model in %s is incomplete: %w", dir, err)
		}
		return nil
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, partialDir)); len(ents) > 0 {
		return fmt.Errorf("model in %s is an interrupted pull (%d partial files); run `shoal model pull` again to finish it", dir, len(ents))
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("model directory: %w", err)
	}
	n := 0
	var missing []string
	for _, e := range ents {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") {
			continue
		}
		n++
		if strings.HasSuffix(name, ".safetensors") || strings.HasSuffix(name, ".bin") {
			if info, err := e.Info(); err == nil && info.Size() == 0 {
				missing = append(missing, name+" (empty)")
			}
		}
		if strings.HasSuffix(name, ".safetensors.index.json") {
			var idx struct {
				WeightMap map[string]string `json:"weight_map"`
			}
			if err := readJSON(filepath.Join(dir, name), &idx); err != nil {
				return fmt.Errorf("model in %s: %s is not valid JSON: %w", dir, name, err)
			}
			seen := map[string]bool{}
			for _, shard := range idx.WeightMap {
				if seen[shard] {
					continue
				}
				seen[shard] = true
				if safeRel(shard) != nil {
					return fmt.Errorf("model in %s: %s names a shard outside the directory: %q", dir, name, shard)
				}
				if st, err := os.Stat(filepath.Join(dir, shard)); err != nil || st.Size() == 0 {
					missing = append(missing, shard)
				}
			}
		}
	}
	if n == 0 {
		return fmt.Errorf("model directory %s is empty", dir)
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		if len(missing) > 5 {
			missing = append(missing[:5], fmt.Sprintf("and %d more", len(missing)-5))
		}
		return fmt.Errorf("model in %s is incomplete: missing %s", dir, strings.Join(missing, ", "))
	}
	return nil
}

// lock takes the directory's download lock, waiting (and saying so) while
// another process holds it. flock is per open file, so two pulls in one
// process exclude each other too.
func lock(ctx context.Context, dir string, waiting func(holder string)) (func(), error) {
	p := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("download lock: %w", err)
	}
	last := time.Time{}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			_ = f.Truncate(0)
			_, _ = f.WriteAt([]byte(fmt.Sprintf("pid %d\n", os.Getpid())), 0)
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("download lock %s: %w", p, err)
		}
		if time.Since(last) > 10*time.Second {
			b, _ := os.ReadFile(p)
			waiting(strings.TrimSpace(string(b)))
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// freeBytes is the space available to an unprivileged writer under dir.
func freeBytes(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}
