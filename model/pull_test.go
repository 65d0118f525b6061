package model

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func sizes() map[string]int {
	return map[string]int{
		"config.json":                      300,
		"tokenizer.json":                   5000,
		"model-00001-of-00002.safetensors": 3<<20 + 17,
		"model-00002-of-00002.safetensors": 2<<20 + 5,
		"sub/dir/extra.py":                 0,
	}
}

func opts(dir string) Options {
	return Options{Dir: dir, Workers: 4, ChunkSize: 256 << 10}
}

func requireSame(t *testing.T, m *memSource, dir string) {
	t.Helper()
	for n, b := range m.files {
		got, err := os.ReadFile(filepath.Join(dir, n))
		require.NoError(t, err, n)
		require.Equal(t, len(b), len(got), n)
		require.True(t, string(b) == string(got), "%s differs", n)
	}
}

func total(m *memSource) int64 {
	var n int64
	for _, b := range m.files {
		n += int64(len(b))
	}
	return n
}

func TestPullFetchesVerifiesAndMarksComplete(t *testing.T) {
	m := newMem("mem://a", sizes())
	dir := t.TempDir()
	var last Progress
	o := opts(dir)
	o.OnProgress = func(p Progress) { last = p }
	man, err := Pull(context.Background(), m, o)
	require.NoError(t, err)
	requireSame(t, m, dir)
	require.Len(t, man.Files, 5)
	require.Equal(t, total(m), man.Bytes)
	require.Equal(t, "complete", last.Phase)
	require.Equal(t, last.Bytes, last.BytesDone)
	require.True(t, Complete(dir, "mem://a"))
	require.NoError(t, Check(dir))
	_, err = os.Stat(filepath.Join(dir, partialDir))
	require.True(t, os.IsNotExist(err), "partial data is cleaned up")

	// A complete model is never fetched again.
	before := m.reads.Load()
	_, err = Pull(context.Background(), m, o)
	require.NoError(t, err)
	require.Equal(t, before, m.reads.Load())

	// Another source into the same directory is refused.
	_, err = Pull(context.Background(), newMem("mem://b", sizes()), o)
	require.ErrorContains(t, err, "already holds mem://a")
}

func TestPullResumesAtTheByteReached(t *testing.T) {
	m := newMem("mem://a", sizes())
	dir := t.TempDir()
	m.cutAfter = total(m) / 2
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for m.read.Load() < m.cutAfter {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(2500 * time.Millisecond) // let a progress record be written
		cancel()
	}()
	_, err := Pull(ctx, m, opts(dir))
	require.ErrorIs(t, err, context.Canceled)
	require.False(t, Complete(dir, "mem://a"))
	require.ErrorContains(t, Check(dir), "interrupted pull")
	first := m.read.Load()

	m.cutAfter = 0
	var resumed int64
	o := opts(dir)
	o.OnProgress = func(p Progress) { resumed = p.Reused }
	_, err = Pull(context.Background(), m, o)
	require.NoError(t, err)
	requireSame(t, m, dir)
	second := m.read.Load() - first
	require.Greater(t, resumed, int64(0), "the second pull reuses bytes")
	require.Less(t, second, total(m), "the second pull fetched only what was missing")
	require.LessOrEqual(t, first+second, total(m)+int64(o.Workers)*(1<<20), "bytes fetched twice stay below one buffer per worker")
}

func TestPullRetriesTransientErrors(t *testing.T) {
	m := newMem("mem://a", sizes())
	m.failEvery = 3
	dir := t.TempDir()
	_, err := Pull(context.Background(), m, opts(dir))
	require.NoError(t, err)
	requireSame(t, m, dir)
}

func TestPullDetectsCorruptionAndRefetches(t *testing.T) {
	m := newMem("mem://a", sizes())
	m.corrupt = 1
	dir := t.TempDir()
	_, err := Pull(context.Background(), m, opts(dir))
	require.NoError(t, err)
	requireSame(t, m, dir)

	m2 := newMem("mem://c", sizes())
	m2.corrupt = 1 << 30 // the source itself serves bad bytes
	_, err = Pull(context.Background(), m2, opts(t.TempDir()))
	require.ErrorContains(t, err, "md5 mismatch")
	require.ErrorContains(t, err, "source object may be corrupt")
}

func TestPullDetectsCorruptedPartialOnDisk(t *testing.T) {
	m := newMem("mem://a", map[string]int{"w.safetensors": 4 << 20})
	dir := t.TempDir()
	m.cutAfter = 3 << 20
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for m.read.Load() < m.cutAfter {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(2500 * time.Millisecond)
		cancel()
	}()
	_, err := Pull(ctx, m, opts(dir))
	require.Error(t, err)
	part := filepath.Join(dir, partialDir, "w.safetensors")
	f, err := os.OpenFile(part, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte("garbage!"), 1000) // inside a part already recorded as done
	require.NoError(t, err)
	f.Close()
	m.cutAfter = 0
	_, err = Pull(context.Background(), m, opts(dir))
	require.NoError(t, err)
	requireSame(t, m, dir)
}

func TestPullSharesOneCopyBetweenConcurrentPullers(t *testing.T) {
	m := newMem("mem://a", sizes())
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, errs[i] = Pull(context.Background(), m, opts(dir))
		}(i)
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, total(m), m.read.Load(), "every byte was fetched exactly once")
	requireSame(t, m, dir)
}

func TestPullKeepsPresentFilesWithoutDigest(t *testing.T) {
	m := newMem("mem://a", sizes())
	m.noDigest = true
	dir := t.TempDir()
	_, err := Pull(context.Background(), m, opts(dir))
	require.NoError(t, err)
	requireSame(t, m, dir)
	// Lose the completion record: files of the right size are kept on re-pull.
	require.NoError(t, os.Remove(filepath.Join(dir, completeFile)))
	before := m.read.Load()
	_, err = Pull(context.Background(), m, opts(dir))
	require.NoError(t, err)
	require.Equal(t, before, m.read.Load())
}

func TestPullFilter(t *testing.T) {
	m := newMem("mem://a", map[string]int{"config.json": 10, "copy": 10, "model.py": 10, "w.safetensors": 10, "README.md": 10})
	dir := t.TempDir()
	o := opts(dir)
	o.Filter = Filter{Suffixes: []string{"json", ".py", "safetensors"}}
	man, err := Pull(context.Background(), m, o)
	require.NoError(t, err)
	var names []string
	for _, f := range man.Files {
		names = append(names, f.Name)
	}
	require.Equal(t, []string{"config.json", "model.py", "w.safetensors"}, names)
	_, err = os.Stat(filepath.Join(dir, "copy"))
	require.True(t, os.IsNotExist(err))

	o.Dir, o.Filter = t.TempDir(), Filter{Suffixes: []string{"gguf"}}
	_, err = Pull(context.Background(), m, o)
	require.ErrorContains(t, err, "kept none of its 5 files")
}

func TestCheckLocalDirectory(t *testing.T) {
	dir := t.TempDir()
	require.ErrorContains(t, Check(dir), "is empty")
	require.ErrorContains(t, Check(filepath.Join(dir, "nope")), "no such file")
	idx := `{"metadata":{},"weight_map":{"a":"model-00001.safetensors","b":"model-00002.safetensors"}}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(idx), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model-00001.safetensors"), []byte("x"), 0o644))
	err := Check(dir)
	require.ErrorContains(t, err, "missing model-00002.safetensors")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model-00002.safetensors"), []byte("x"), 0o644))
	require.NoError(t, Check(dir))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(`{"weight_map":{"a":"../etc/passwd"}}`), 0o644))
	require.ErrorContains(t, Check(dir), "outside the directory")
}

func TestFilterSemantics(t *testing.T) {
	cases := []struct {
		f    Filter
		name string
		want bool
	}{
		{Filter{Suffixes: []string{"py"}}, "modeling_deepseek.py", true},
		{Filter{Suffixes: []string{"py"}}, "copy", false},
		{Filter{Suffixes: []string{".py"}}, "sub/x.py", true},
		{Filter{Suffixes: []string{"json"}}, "json", false},
		{Filter{Suffixes: []string{"tar.gz"}}, "a.tar.gz", true},
		{Filter{}, "anything", true},
		{Filter{Include: []string{"*.safetensors"}}, "a/b.safetensors", true},
		{Filter{Include: []string{"original/*"}}, "original/x.pth", true},
		{Filter{Exclude: []string{"original/*"}}, "original/x.pth", false},
		{Filter{Suffixes: []string{"json"}, Exclude: []string{"*-eval.json"}}, "x-eval.json", false},
	}
	for _, c := range cases {
		require.Equal(t, c.want, c.f.Match(c.name), "%+v %s", c.f, c.name)
	}
	require.ErrorContains(t, Filter{Include: []string{"[x"}}.Check(), "glob")
	require.ErrorContains(t, Filter{Suffixes: []string{"*.py"}}.Check(), "suffix")
}

func TestParseURI(t *testing.T) {
	good := []struct {
		in   string
		want URI
		name string
	}{
		{"hf://deepseek-ai/DeepSeek-R1", URI{Scheme: SchemeHF, Bucket: "deepseek-ai/DeepSeek-R1", Revision: "main"}, "DeepSeek-R1"},
		{"hf://org/m@v1.0", URI{Scheme: SchemeHF, Bucket: "org/m", Revision: "v1.0"}, "m@v1.0"},
		{"hf://org/m@refs/pr/12", URI{Scheme: SchemeHF, Bucket: "org/m", Revision: "refs/pr/12"}, "m@refs--pr--12"},
		{"s3://models/deepseek-r1/", URI{Scheme: SchemeS3, Bucket: "models", Prefix: "deepseek-r1"}, "deepseek-r1"},
		{"s3://models/a/b", URI{Scheme: SchemeS3, Bucket: "models", Prefix: "a/b"}, "b"},
		{"s3://models", URI{Scheme: SchemeS3, Bucket: "models"}, "models"},
		{"gs://bkt/x", URI{Scheme: SchemeGCS, Bucket: "bkt", Prefix: "x"}, "x"},
		{"/mnt/models/x/", URI{Scheme: SchemeLocal, Path: "/mnt/models/x"}, "x"},
		{"file:///mnt/m", URI{Scheme: SchemeLocal, Path: "/mnt/m"}, "m"},
	}
	for _, c := range good {
		u, err := ParseURI(c.in)
		require.NoError(t, err, c.in)
		c.want.raw = c.in
		require.Equal(t, c.want, u, c.in)
		require.Equal(t, c.name, u.Name(), c.in)
	}
	bad := map[string]string{
		"ftp://x/y":        "unsupported scheme",
		"s3://":            "no bucket",
		"s3://a/b":         "not a valid bucket",
		"s3://bkt/a/../b":  "'..'",
		"s3://bkt/a//b":    "empty",
		"hf://org":         "org/name",
		"hf://org/m@":      "empty revision",
		"hf://org/m@a b":   "not a branch",
		"hf://../x":        "org/name",
		"relative/path":    "absolute path",
		"file://rel":       "absolute",
		"s3://bkt/a\nb":    "control",
		"hf://o/m@../../x": "not a branch",
	}
	for in, want := range bad {
		_, err := ParseURI(in)
		require.Error(t, err, in)
		require.True(t, strings.Contains(err.Error(), want), "%s: %v", in, err)
	}
}

func TestPullRateLimit(t *testing.T) {
	m := newMem("mem://a", map[string]int{"w.safetensors": 3 << 20})
	o := opts(t.TempDir())
	o.RateLimit = 2 << 20 // 3 MiB at 2 MiB/s, with a quarter-second burst: ≥ 1.25 s
	start := time.Now()
	_, err := Pull(context.Background(), m, o)
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(start), 1200*time.Millisecond, "the limit holds across workers")
}
