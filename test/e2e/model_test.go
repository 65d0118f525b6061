package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/internal/s3test"
	"github.com/stretchr/testify/require"
)

func dirBytes(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			st := info.Sys().(*syscall.Stat_t)
			n += st.Blocks * 512 // allocated, not apparent: partial files are sparse
		}
		return nil
	})
	return n
}

func requireTree(t *testing.T, dir string, data map[string][]byte, skip func(string) bool) {
	t.Helper()
	for name, b := range data {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if skip != nil && skip(name) {
			require.True(t, os.IsNotExist(err), "%s should have been filtered out", name)
			continue
		}
		require.NoError(t, err, name)
		require.True(t, bytes.Equal(b, got), "%s differs", name)
	}
}

// TestModelPullKillResumeCorrupt pulls a generated model with several
// multi-hundred-MB shards from a real S3 server (versitygw), SIGKILLs the
// CLI mid-download, corrupts bytes the interrupted pull had recorded as
// done, and pulls again: the second pull resumes, catches the corruption by
// MD5, fetches that file again, and ends with every file byte-identical.
func TestModelPullKillResumeCorrupt(t *testing.T) {
	srv := s3test.Start(t)
	tree := s3test.ModelTree(3, 200)
	data, err := srv.Put(context.Background(), "models", "tiny-r1", tree, 0)
	require.NoError(t, err)
	var total int64
	for _, b := range data {
		total += int64(len(b))
	}
	dir := filepath.Join(t.TempDir(), "tiny-r1")
	pull := func(extra ...string) *exec.Cmd {
		args := append([]string{"model", "pull", "s3://models/tiny-r1", "--dir", dir, "--suffix", "json,safetensors,py",
			"--no-progress", "--part-size", "16MiB", "--workers", "8"}, extra...)
		cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
		cmd.Env = append(os.Environ(), srv.Env()...)
		return cmd
	}
	var log1 syncBuffer
	first := pull("--limit-rate", "100MiB")
	first.Stderr = &log1
	require.NoError(t, first.Start())
	partial := filepath.Join(dir, ".shoal", "partial")
	// Kill once a shard has a progress record, a third of the model is in.
	require.Eventually(t, func() bool {
		states, _ := filepath.Glob(filepath.Join(partial, "*.safetensors.state"))
		return len(states) > 0 && dirBytes(dir) > total/3
	}, 60*time.Second, 20*time.Millisecond, log1.String())
	require.NoError(t, first.Process.Signal(syscall.SIGKILL))
	_ = first.Wait()

	out, err := exec.Command(filepath.Join(binDir, "shoal"), "model", "check", dir).CombinedOutput()
	require.Error(t, err, "an interrupted pull is never reported complete")
	require.Contains(t, string(out), "interrupted pull")

	// Corrupt the first recorded-done bytes of a shard's partial file.
	states, _ := filepath.Glob(filepath.Join(partial, "*.safetensors.state"))
	require.NotEmpty(t, states, "the killed pull left progress records")
	var st struct {
		Chunk int64   `json:"chunk"`
		Done  []int64 `json:"done"`
	}
	b, err := os.ReadFile(states[0])
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &st))
	corrupted := false
	for i, d := range st.Done {
		if d > 100 {
			f, err := os.OpenFile(strings.TrimSuffix(states[0], ".state"), os.O_RDWR, 0)
			require.NoError(t, err)
			_, err = f.WriteAt([]byte("not the bytes you are looking for"), int64(i)*st.Chunk+10)
			require.NoError(t, err)
			f.Close()
			corrupted = true
			break
		}
	}
	require.True(t, corrupted, "some part was recorded as done: %s", b)

	second := pull()
	var log2 bytes.Buffer
	second.Stderr = &log2
	var stdout bytes.Buffer
	second.Stdout = &stdout
	require.NoError(t, second.Run(), log2.String())
	logs := log2.String()
	require.Contains(t, logs, "model file resuming")
	require.Contains(t, logs, "failed verification")
	require.Contains(t, logs, "md5 mismatch")
	require.Equal(t, dir, strings.TrimSpace(stdout.String()), "the path is printed on stdout")
	requireTree(t, dir, data, func(n string) bool { return strings.HasSuffix(n, ".md") || strings.HasSuffix(n, ".png") })

	out, err = exec.Command(filepath.Join(binDir, "shoal"), "model", "check", dir).CombinedOutput()
	require.NoError(t, err, string(out))
	// A third pull finds the model complete and fetches nothing.
	third := pull()
	out, err = third.CombinedOutput()
	require.NoError(t, err, string(out))
	require.Contains(t, string(out), "model already complete")
}

// TestModelPullWaitsOutAFullDisk fills a small tmpfs so the pull hits ENOSPC,
// then frees space: the pull waits, says why, and completes.
func TestModelPullWaitsOutAFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	srv := s3test.Start(t)
	data, err := srv.Put(context.Background(), "models", "m", s3test.Tree{"config.json": 500, "a.safetensors": 30 << 20, "b.safetensors": 30 << 20}, 0)
	require.NoError(t, err)
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	filler := filepath.Join(mnt, "filler")
	require.NoError(t, os.WriteFile(filler, make([]byte, 40<<20), 0o644))
	dir := filepath.Join(mnt, "m")
	cmd := exec.Command(filepath.Join(binDir, "shoal"), "model", "pull", "s3://models/m", "--dir", dir, "--no-progress", "--part-size", "4MiB", "--workers", "4")
	cmd.Env = append(os.Environ(), srv.Env()...)
	var logs syncBuffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "disk full; waiting for space") }, 30*time.Second, 50*time.Millisecond, logs.String())
	select {
	case err := <-done:
		t.Fatalf("the pull ended on a full disk instead of waiting: %v\n%s", err, logs.String())
	case <-time.After(time.Second):
	}
	require.NoError(t, os.Remove(filler))
	select {
	case err := <-done:
		require.NoError(t, err, logs.String())
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("the pull did not finish after space returned\n%s", logs.String())
	}
	requireTree(t, dir, data, nil)
}

// TestClusterPullsWeightsBeforeServing: a 2-node deployment whose weights are
// on S3. Every member pulls its own copy to its models directory (shown as
// DOWNLOADING in `shoal get replicas`), the engine is launched on the local
// path, and the replica serves. A deployment on a local path that is not a
// complete model never starts its engine and says why.
func TestClusterPullsWeightsBeforeServing(t *testing.T) {
	srv := s3test.Start(t)
	data, err := srv.Put(context.Background(), "models", "tiny", s3test.ModelTree(2, 20), 0)
	require.NoError(t, err)
	e := startCluster(t, 19, 2, func(c *devcluster.Config) {
		c.CheckModels = true
		c.SimEnv = append(c.SimEnv, srv.Env()...)
		c.SimEnv = append(c.SimEnv, "SHOAL_DOWNLOAD_LIMIT_RATE=20MiB", "SHOAL_DOWNLOAD_WORKERS=4", "SHOAL_DOWNLOAD_PART_SIZE=4MiB")
	})
	e.apply("w", `apiVersion: shoal/v1
kind: Deployment
name: w
model: {source: s3://models/tiny, suffixes: [json, safetensors, py]}
engine: {kind: ray-vllm, servedModelName: w, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 120}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {count: 1}
`)
	sawDownloading := false
	require.Eventually(t, func() bool {
		out, _ := e.shoal("get", "replicas")
		if strings.Contains(out, "DOWNLOADING") && strings.Contains(out, "/s") {
			sawDownloading = true
		}
		return readyCount(e.replicas()) == 1
	}, 90*time.Second, 200*time.Millisecond)
	require.True(t, sawDownloading, "get replicas showed the pull with its progress")
	for i := 0; i < 2; i++ {
		dir := filepath.Join(e.dir, devcluster.NodeID(i), "models", "tiny")
		requireTree(t, dir, data, func(n string) bool { return strings.HasSuffix(n, ".md") || strings.HasSuffix(n, ".png") })
	}
	logs, _ := os.ReadFile(filepath.Join(e.dir, "logs", devcluster.NodeID(0)+".log"))
	logs1, _ := os.ReadFile(filepath.Join(e.dir, "logs", devcluster.NodeID(1)+".log"))
	both := string(logs) + string(logs1)
	require.Contains(t, both, "model file done")
	require.Contains(t, both, fmt.Sprintf("vllm serve %s", filepath.Join(e.dir, "node-")), "vllm serve gets the local path")

	// A local path that is not a complete model: the engine never starts.
	bad := filepath.Join(e.dir, "incomplete")
	require.NoError(t, os.MkdirAll(bad, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(bad, "model.safetensors.index.json"), []byte(`{"weight_map":{"x":"model-00001-of-00002.safetensors"}}`), 0o644))
	out, err := e.shoal("delete", "deployment", "w")
	require.NoError(t, err, out)
	e.apply("bad", fmt.Sprintf(`apiVersion: shoal/v1
kind: Deployment
name: bad
model: {source: %s}
engine: {kind: ray-vllm, servedModelName: bad, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {count: 1}
`, bad))
	require.Eventually(t, func() bool {
		out, _ := e.shoal("describe", "deployment", "bad")
		return strings.Contains(out, "missing model-00001-of-00002.safetensors")
	}, 30*time.Second, 200*time.Millisecond)
}

// syncBuffer is a bytes.Buffer safe for a process writer and a test reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
