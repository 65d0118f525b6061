// Package secretfile writes the files shoal's daemons read secrets from (API
// keys, the gossip keyring, private keys) so that the daemons that need them
// can: a packaged install runs the coordinator and router as user shoal and
// the agent as root, and every one of them reads (the keyring: rewrites)
// files under /etc/shoal.
package secretfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// Group is the system group the packaged daemons share (a variable for
// tests, which cannot create one).
var Group = "shoal"

// Write replaces path with data, atomically where it can. A file that
// exists keeps its mode, owner and group; a new one is mode (0600 or 0640
// for secrets) with group shoal when that group exists and the writer may
// give it (root), so a daemon running as shoal can read what root wrote.
// When the directory cannot take a new file (a daemon that may rewrite the
// file but not its directory, such as the coordinator with
// /etc/shoal/gossip.key: a root-owned directory, and read-only under its
// unit's ProtectSystem=strict but for that one file, ReadWritePaths), the
// file is rewritten in place. Errors name the
// file and what to change.
func Write(path string, data []byte, mode fs.FileMode) error {
	st, statErr := os.Stat(path)
	if statErr == nil {
		mode = st.Mode().Perm()
	}
	// A name of its own: the agents (root) and the coordinator and routers
	// may rewrite one file at the same moment (a keyring change reaches
	// every node at once).
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-*")
	if err != nil && (errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS)) && statErr == nil {
		// No new file in the directory: rewrite in place (the file's own
		// permission decides).
		f, oerr := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
		if oerr != nil {
			return explain(path, oerr, "write")
		}
		_, werr := f.Write(data)
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		return explain(path, werr, "write")
	}
	if err != nil {
		return explain(path, err, "write")
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return explain(tmp, err, "write")
	}
	// CreateTemp makes it 0600: set the mode exactly.
	if err := os.Chmod(tmp, mode); err != nil {
		os.Remove(tmp)
		return explain(tmp, err, "write")
	}
	if statErr == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			_ = os.Lchown(tmp, int(sys.Uid), int(sys.Gid)) // as it was (works for root or the owner keeping its group)
		}
	} else if os.Geteuid() == 0 {
		if g, err := user.LookupGroup(Group); err == nil {
			if gid, err := strconv.Atoi(g.Gid); err == nil {
				_ = os.Lchown(tmp, 0, gid)
				if mode&0o040 == 0 {
					mode |= 0o040 // the group reads it
					_ = os.Chmod(tmp, mode)
				}
			}
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return explain(path, err, "write")
	}
	return nil
}

// Explain wraps a read error of a daemon's file: when a permission is
// missing it names the file, its mode, owner and group, and this process's
// user, and says what a packaged install expects.
func Explain(path string, err error) error { return explain(path, err, "read") }

// explain names the file, its owner and mode, and this process's user when
// a permission is missing.
func explain(path string, err error, op string) error {
	if err == nil || !errors.Is(err, fs.ErrPermission) {
		return err
	}
	who := "uid " + strconv.Itoa(os.Geteuid())
	if u, uerr := user.Current(); uerr == nil {
		who = u.Username
	}
	what := path
	for p := path; ; p = filepath.Dir(p) {
		if st, serr := os.Stat(p); serr == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				what = fmt.Sprintf("%s (%s, uid %d, gid %d)", p, st.Mode().Perm(), sys.Uid, sys.Gid)
			}
			break
		}
		if p == filepath.Dir(p) {
			break
		}
	}
	return fmt.Errorf("%w: %s cannot %s %s; a packaged install keeps it readable by group %s (chgrp %s; chmod g+r, or g+rw for the gossip key file)",
		err, who, op, what, Group, Group)
}
