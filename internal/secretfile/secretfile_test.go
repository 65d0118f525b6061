package secretfile

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if p := os.Getenv("SECRETFILE_HELPER_WRITE"); p != "" {
		// The child: write as the unprivileged user it runs as.
		if err := Write(p, []byte("new\n"), 0o600); err != nil {
			os.Stderr.WriteString(err.Error())
			os.Exit(3)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the files' owners and groups are what is tested (CI runs as root)")
	}
}

func gidOf(t *testing.T, p string) (uint32, os.FileMode) {
	st, err := os.Stat(p)
	require.NoError(t, err)
	return st.Sys().(*syscall.Stat_t).Gid, st.Mode().Perm()
}

// TestNewFileIsTheGroupsToRead: root writes a new secret: mode as asked plus
// g+r, group shoal (here "daemon": tests cannot create groups).
func TestNewFileIsTheGroupsToRead(t *testing.T) {
	needRoot(t)
	old := Group
	Group = "daemon"
	defer func() { Group = old }()
	g, err := user.LookupGroup("daemon")
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "keys.yaml")
	require.NoError(t, Write(p, []byte("k\n"), 0o600))
	gid, mode := gidOf(t, p)
	require.Equal(t, g.Gid, strconv.Itoa(int(gid)))
	require.Equal(t, os.FileMode(0o640), mode)
	b, _ := os.ReadFile(p)
	require.Equal(t, "k\n", string(b))
}

// TestExistingFileKeepsItsModeAndGroup: a rewrite (an agent rotating the
// shared gossip key as root) keeps 0660 root:group, not 0600 root:root.
func TestExistingFileKeepsItsModeAndGroup(t *testing.T) {
	needRoot(t)
	p := filepath.Join(t.TempDir(), "gossip.key")
	require.NoError(t, os.WriteFile(p, []byte("old\n"), 0o660))
	require.NoError(t, os.Chmod(p, 0o660))
	require.NoError(t, os.Chown(p, 0, 1))
	require.NoError(t, Write(p, []byte("new\n"), 0o600))
	gid, mode := gidOf(t, p)
	require.Equal(t, uint32(1), gid)
	require.Equal(t, os.FileMode(0o660), mode)
}

// openDir is a directory under /tmp that user nobody can enter (t.TempDir's
// parents are root's alone).
func openDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "secretfile-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// asNobody runs Write(p) in a child process (this test binary, copied where
// nobody may run it) as user nobody.
func asNobody(t *testing.T, p string) (string, error) {
	bin := filepath.Join(openDir(t), "secretfile.test")
	b, err := os.ReadFile(os.Args[0])
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, b, 0o755))
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "SECRETFILE_HELPER_WRITE="+p)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestRewriteInPlaceWhenTheDirectoryIsClosed: a daemon that may write the
// file but not its directory (the coordinator, user shoal, and
// /etc/shoal/gossip.key in the root-owned /etc/shoal) rewrites it in place;
// one that may not write the file gets an error naming file, mode and fix.
func TestRewriteInPlaceWhenTheDirectoryIsClosed(t *testing.T) {
	needRoot(t)
	p := filepath.Join(openDir(t), "gossip.key")
	require.NoError(t, os.WriteFile(p, []byte("old\n"), 0o666))
	require.NoError(t, os.Chmod(p, 0o666))
	out, err := asNobody(t, p)
	require.NoError(t, err, out)
	b, _ := os.ReadFile(p)
	require.Equal(t, "new\n", string(b))

	require.NoError(t, os.Chmod(p, 0o600))
	out, err = asNobody(t, p)
	require.Error(t, err)
	require.Contains(t, out, "cannot write "+p)
	require.Contains(t, out, "-rw-------")
	require.Contains(t, out, "group shoal")
}

// TestConcurrentWriters: writers rewriting one file at once (a keyring
// change reaching the agents and the coordinator together) each succeed,
// the file is one of their contents whole, and no temporary file is left.
func TestConcurrentWriters(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "gossip.key")
	require.NoError(t, os.WriteFile(p, []byte("old\n"), 0o600))
	errs := make(chan error, 8*20)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				errs <- Write(p, []byte(strings.Repeat(strconv.Itoa(w), 100)+"\n"), 0o600)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	require.Len(t, b, 101)
	require.Equal(t, strings.Repeat(string(b[0]), 100)+"\n", string(b))
	left, _ := filepath.Glob(filepath.Join(dir, "*.tmp*"))
	require.Empty(t, left)
}
