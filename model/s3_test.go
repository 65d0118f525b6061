package model

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/shoalhq/shoal/internal/s3test"
	"github.com/stretchr/testify/require"
)

func s3Env(t *testing.T, srv *s3test.Server) {
	for _, kv := range srv.Env() {
		k, v, _ := cut(kv)
		t.Setenv(k, v)
	}
}

func cut(kv string) (string, string, bool) {
	for i := range kv {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}

func TestS3PullFromARealServer(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	tree := s3test.ModelTree(2, 6)
	tree["big.safetensors"] = 40 << 20 // uploaded multipart: its ETag is not an MD5
	data, err := srv.Put(ctx, "models", "org/tiny-r1", tree, 32)
	require.NoError(t, err)
	s3Env(t, srv)

	u, err := ParseURI("s3://models/org/tiny-r1")
	require.NoError(t, err)
	src, err := Open(ctx, u, Config{Workers: 8})
	require.NoError(t, err)
	files, err := src.List(ctx)
	require.NoError(t, err)
	byName := map[string]File{}
	for _, f := range files {
		byName[f.Name] = f
	}
	require.Len(t, byName, len(tree))
	require.NotEmpty(t, byName["config.json"].MD5, "single-part objects carry their MD5 as ETag")
	require.Empty(t, byName["big.safetensors"].MD5, "multipart ETags are not MD5s")
	require.Contains(t, byName, "figures/benchmark.png", "nested keys keep their relative path")

	dir := filepath.Join(t.TempDir(), u.Name())
	m, err := Pull(ctx, src, Options{Dir: dir, Workers: 8, ChunkSize: 4 << 20, Filter: Filter{Suffixes: []string{"json", "safetensors", "py"}}})
	require.NoError(t, err)
	require.Len(t, m.Files, len(tree)-2, "README.md and the png are filtered out")
	for _, f := range m.Files {
		got, err := os.ReadFile(filepath.Join(dir, f.Name))
		require.NoError(t, err)
		require.True(t, string(got) == string(data[f.Name]), f.Name)
	}
	_, err = os.Stat(filepath.Join(dir, "README.md"))
	require.True(t, os.IsNotExist(err))

	// The object changes after an interrupted pull: the stale partial is dropped.
	require.NoError(t, os.Remove(filepath.Join(dir, completeFile)))
	require.NoError(t, os.Remove(filepath.Join(dir, "config.json")))
	_, err = srv.Client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("models"), Key: aws.String("org/tiny-r1/config.json"), Body: stringsReader(`{"changed":true}`)})
	require.NoError(t, err)
	_, err = Pull(ctx, src, Options{Dir: dir, Workers: 8, Filter: Filter{Suffixes: []string{"json", "safetensors", "py"}}})
	require.NoError(t, err)
	got, _ := os.ReadFile(filepath.Join(dir, "config.json"))
	require.Equal(t, `{"changed":true}`, string(got))
}

func TestS3ErrorsSayWhatToFix(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	_, err := srv.Put(ctx, "models", "m", s3test.Tree{"config.json": 10}, 0)
	require.NoError(t, err)
	s3Env(t, srv)

	u, _ := ParseURI("s3://nobucket/m")
	src, err := Open(ctx, u, Config{})
	require.NoError(t, err)
	_, err = src.List(ctx)
	require.ErrorContains(t, err, "does not exist")

	u, _ = ParseURI("s3://models/absent")
	src, _ = Open(ctx, u, Config{})
	_, err = src.List(ctx)
	require.ErrorIs(t, err, ErrNotFound)

	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-000000")
	u, _ = ParseURI("s3://models/m")
	src, _ = Open(ctx, u, Config{})
	_, err = src.List(ctx)
	require.ErrorContains(t, err, "AWS_ACCESS_KEY_ID")

	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	_, err = Open(ctx, u, Config{})
	require.ErrorContains(t, err, "only one of")
}
