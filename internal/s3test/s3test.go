// Package s3test runs a real S3 server (versitygw with its POSIX backend) on
// loopback for tests and benchmarks, and fills it with generated model trees.
package s3test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// Credentials of the test server's root user.
const (
	AccessKey = "shoaltestaccess"
	SecretKey = "shoaltestsecret0123456789"
)

// Server is a running versitygw.
type Server struct {
	Endpoint string // http://127.0.0.1:PORT
	Root     string // the POSIX backend directory
	Client   *s3.Client
	cmd      *exec.Cmd
}

// Binary finds versitygw on PATH or in GOPATH/bin.
func Binary() (string, error) {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, nil
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		home, _ := os.UserHomeDir()
		gopath = filepath.Join(home, "go")
	}
	p := filepath.Join(gopath, "bin", "versitygw")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("versitygw not found; install it with: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0")
}

// Start runs versitygw for the test's lifetime. Without the binary the test
// is skipped, unless SHOAL_REQUIRE_S3=1 (CI) makes that a failure.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if os.Getenv("SHOAL_REQUIRE_S3") == "1" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	root := t.TempDir()
	s, err := StartAt(bin, root, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// StartAt runs versitygw serving root; logs go to w.
func StartAt(bin, root string, w io.Writer) (*Server, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(bin, "--access", AccessKey, "--secret", SecretKey, "--port", addr, "--keep-alive", "--quiet", "posix", root)
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &Server{Endpoint: "http://" + addr, Root: root, cmd: cmd}
	s.Client = s3.New(s3.Options{
		BaseEndpoint: aws.String(s.Endpoint), Region: "us-east-1", UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(AccessKey, SecretKey, ""),
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(s.Endpoint)
		if err == nil {
			resp.Body.Close()
			return s, nil
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("versitygw did not answer on %s: %w", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop ends the server.
func (s *Server) Stop() {
	if s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
	}
}

// Env is the environment a client needs to reach the server.
func (s *Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + AccessKey, "AWS_SECRET_ACCESS_KEY=" + SecretKey,
		"AWS_ENDPOINT_URL=" + s.Endpoint, "AWS_REGION=us-east-1"}
}

// Tree is a generated model: file name → size. Safetensors files get random
// bytes; the rest get small text.
type Tree map[string]int64

// ModelTree is a small model shaped like a real one: config, tokenizer,
// modelling code, an index and several weight shards of shardMiB each.
func ModelTree(shards int, shardMiB int64) Tree {
	t := Tree{"config.json": 1200, "tokenizer.json": 200 << 10, "tokenizer_config.json": 900,
		"modeling_deepseek.py": 70 << 10, "configuration_deepseek.py": 10 << 10, "README.md": 4000, "figures/benchmark.png": 50 << 10}
	for i := 1; i <= shards; i++ {
		t[fmt.Sprintf("model-%05d-of-%05d.safetensors", i, shards)] = shardMiB<<20 + int64(i)*4099
	}
	t["model.safetensors.index.json"] = 2000
	return t
}

// Put uploads tree under bucket/prefix (creating the bucket); files at or
// over multipartMiB go up as multipart uploads, so their ETags are not MD5s.
// It returns the content, for comparison.
func (s *Server) Put(ctx context.Context, bucket, prefix string, tree Tree, multipartMiB int64) (map[string][]byte, error) {
	_, err := s.Client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(bucket)})
	if err != nil && !bytes.Contains([]byte(err.Error()), []byte("BucketAlreadyOwnedByYou")) {
		return nil, fmt.Errorf("create bucket: %w", err)
	}
	out := map[string][]byte{}
	for name, size := range tree {
		b := make([]byte, size)
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
		key := name
		if prefix != "" {
			key = prefix + "/" + name
		}
		if multipartMiB > 0 && size >= multipartMiB<<20 {
			if err := s.putMultipart(ctx, bucket, key, b); err != nil {
				return nil, err
			}
		} else if _, err := s.Client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(b)}); err != nil {
			return nil, fmt.Errorf("put %s: %w", key, err)
		}
		out[name] = b
	}
	return out, nil
}

func (s *Server) putMultipart(ctx context.Context, bucket, key string, b []byte) error {
	mu, err := s.Client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return err
	}
	const part = 16 << 20
	var parts []types.CompletedPart
	for i, off := int32(1), 0; off < len(b); i, off = i+1, off+part {
		end := min(off+part, len(b))
		r, err := s.Client.UploadPart(ctx, &s3.UploadPartInput{Bucket: aws.String(bucket), Key: aws.String(key), UploadId: mu.UploadId,
			PartNumber: aws.Int32(i), Body: bytes.NewReader(b[off:end])})
		if err != nil {
			return err
		}
		parts = append(parts, types.CompletedPart{ETag: r.ETag, PartNumber: aws.Int32(i)})
	}
	_, err = s.Client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{Bucket: aws.String(bucket), Key: aws.String(key),
		UploadId: mu.UploadId, MultipartUpload: &types.CompletedMultipartUpload{Parts: parts}})
	return err
}
