package model

import (
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeHub implements the Hugging Face Hub endpoints the client uses (model
// revision, recursive tree with Link pagination, resolve with a redirect to a
// CDN path that honours Range). It is a local stand-in, not huggingface.co.
type fakeHub struct {
	repo   string
	commit string
	files  map[string][]byte
	token  string
	page   int
	bad    map[string]bool // serve corrupted bytes for these files
}

func (h *fakeHub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h.token != "" && r.Header.Get("Authorization") != "Bearer "+h.token && !strings.HasPrefix(r.URL.Path, "/cdn/") {
		w.WriteHeader(401)
		fmt.Fprint(w, `{"error":"Invalid credentials in Authorization header"}`)
		return
	}
	p := r.URL.Path
	switch {
	case p == "/api/models/"+h.repo+"/revision/main":
		json.NewEncoder(w).Encode(map[string]any{"id": h.repo, "sha": h.commit})
	case strings.HasPrefix(p, "/api/models/"+h.repo+"/tree/"+h.commit):
		names := make([]string, 0, len(h.files))
		for n := range h.files {
			names = append(names, n)
		}
		sort.Strings(names)
		start, _ := strconv.Atoi(r.URL.Query().Get("cursor"))
		end := min(start+h.page, len(names))
		var out []map[string]any
		if start == 0 {
			out = append(out, map[string]any{"type": "directory", "path": "sub", "oid": strings.Repeat("d", 40), "size": 0})
		}
		for _, n := range names[start:end] {
			b := h.files[n]
			e := map[string]any{"type": "file", "path": n, "size": len(b)}
			if strings.HasSuffix(n, ".safetensors") {
				sum := sha256.Sum256(b)
				e["oid"] = strings.Repeat("a", 40)
				e["lfs"] = map[string]any{"oid": hex.EncodeToString(sum[:]), "size": len(b), "pointerSize": 134}
				e["size"] = 134
			} else {
				s := sha1.New()
				fmt.Fprintf(s, "blob %d\x00", len(b))
				s.Write(b)
				e["oid"] = hex.EncodeToString(s.Sum(nil))
			}
			out = append(out, e)
		}
		if end < len(names) {
			w.Header().Set("Link", fmt.Sprintf(`<http://%s%s?recursive=true&cursor=%d>; rel="next"`, r.Host, p, end))
		}
		json.NewEncoder(w).Encode(out)
	case strings.HasPrefix(p, "/"+h.repo+"/resolve/"+h.commit+"/"):
		name := strings.TrimPrefix(p, "/"+h.repo+"/resolve/"+h.commit+"/")
		if _, ok := h.files[name]; !ok {
			w.WriteHeader(404)
			return
		}
		http.Redirect(w, r, "/cdn/"+name, http.StatusFound)
	case strings.HasPrefix(p, "/cdn/"):
		name := strings.TrimPrefix(p, "/cdn/")
		b := h.files[name]
		if h.bad[name] {
			b = bytes.Clone(b)
			b[0] ^= 1
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(b))
	default:
		w.WriteHeader(404)
		fmt.Fprint(w, `{"error":"Repository not found"}`)
	}
}

func TestHFPullThroughTheHubAPI(t *testing.T) {
	mem := newMem("x", map[string]int{"config.json": 700, "tokenizer.json": 9000, "model-00001-of-00002.safetensors": 3 << 20,
		"model-00002-of-00002.safetensors": 1<<20 + 3, "sub/modeling.py": 100, "README.md": 50})
	hub := &fakeHub{repo: "org/tiny", commit: strings.Repeat("c", 40), files: mem.files, token: "hf_secret", page: 2}
	srv := httptest.NewServer(hub)
	defer srv.Close()

	u, err := ParseURI("hf://org/tiny")
	require.NoError(t, err)
	src, err := Open(context.Background(), u, Config{HFEndpoint: srv.URL, HFToken: "hf_secret"})
	require.NoError(t, err)
	files, err := src.List(context.Background())
	require.NoError(t, err)
	require.Len(t, files, 6, "all pages were read, directories skipped")
	for _, f := range files {
		if strings.HasSuffix(f.Name, ".safetensors") {
			require.NotEmpty(t, f.SHA256, f.Name)
			require.Equal(t, int64(len(mem.files[f.Name])), f.Size, "LFS size, not the pointer's")
		} else {
			require.NotEmpty(t, f.GitSHA1, f.Name)
		}
	}
	dir := t.TempDir()
	_, err = Pull(context.Background(), src, Options{Dir: dir, Workers: 4, ChunkSize: 1 << 20, Filter: Filter{Suffixes: []string{"json", "safetensors", "py"}}})
	require.NoError(t, err)
	for n, b := range mem.files {
		got, err := os.ReadFile(filepath.Join(dir, n))
		if n == "README.md" {
			require.True(t, os.IsNotExist(err))
			continue
		}
		require.NoError(t, err)
		require.True(t, bytes.Equal(b, got), n)
	}

	// Bad bytes from the CDN are caught by the LFS sha256 and by the git blob hash.
	hub.bad = map[string]bool{"model-00002-of-00002.safetensors": true, "config.json": true}
	_, err = Pull(context.Background(), src, Options{Dir: t.TempDir(), Workers: 4, ChunkSize: 1 << 20})
	require.Error(t, err)
	require.Regexp(t, "(sha256|git blob sha1) mismatch", err.Error())

	// A wrong token gets an error that says where to look.
	bad, _ := Open(context.Background(), u, Config{HFEndpoint: srv.URL, HFToken: "nope"})
	_, err = bad.List(context.Background())
	require.ErrorContains(t, err, "HF_TOKEN")
	u2, _ := ParseURI("hf://org/absent")
	missing, _ := Open(context.Background(), u2, Config{HFEndpoint: srv.URL, HFToken: "hf_secret"})
	_, err = missing.List(context.Background())
	require.ErrorContains(t, err, "404")
}

func TestParseHFTreeRejectsHostileEntries(t *testing.T) {
	for body, want := range map[string]string{
		`{"not":"an array"}`: "expected JSON array",
		`[{"type":"file","path":"../../etc/passwd","size":1}]`:                           "leaves the model directory",
		`[{"type":"file","path":"/etc/passwd","size":1}]`:                                "not a relative path",
		`[{"type":"file","path":".shoal/complete","size":1}]`:                            "collides",
		`[{"type":"file","path":"a.safetensors","size":1,"lfs":{"oid":"xyz","size":1}}]`: "malformed LFS sha256",
		`[{"type":"file","path":"a","size":-5}]`:                                         "negative size",
	} {
		_, err := parseHFTree([]byte(body))
		require.ErrorContains(t, err, want, body)
	}
	require.Equal(t, "http://h/x?cursor=2", nextLink(`<http://h/x?cursor=2>; rel="next"`))
	require.Equal(t, "", nextLink(`<http://h/x>; rel="prev"`))
}

func TestGCSPullThroughTheJSONAPI(t *testing.T) {
	mem := newMem("x", map[string]int{"config.json": 700, "model.safetensors": 2<<20 + 9})
	mux := http.NewServeMux()
	mux.HandleFunc("/storage/v1/b/bkt/o", func(w http.ResponseWriter, r *http.Request) {
		require.Equal(t, "m/r1/", r.URL.Query().Get("prefix"))
		var items []map[string]any
		items = append(items, map[string]any{"name": "m/r1/", "size": "0"})
		for n, b := range mem.files {
			items = append(items, map[string]any{"name": "m/r1/" + n, "size": strconv.Itoa(len(b)), "md5Hash": md5b64(b)})
		}
		json.NewEncoder(w).Encode(map[string]any{"items": items})
	})
	mux.HandleFunc("/storage/v1/b/bkt/o/", func(w http.ResponseWriter, r *http.Request) {
		require.Equal(t, "media", r.URL.Query().Get("alt"))
		name := strings.TrimPrefix(r.URL.Path, "/storage/v1/b/bkt/o/m/r1/")
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(mem.files[name]))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	u, _ := ParseURI("gs://bkt/m/r1")
	src, err := Open(context.Background(), u, Config{GCSEndpoint: strings.TrimPrefix(srv.URL, "http://")})
	require.NoError(t, err)
	dir := t.TempDir()
	m, err := Pull(context.Background(), src, Options{Dir: dir, Workers: 3, ChunkSize: 1 << 20})
	require.NoError(t, err)
	require.Len(t, m.Files, 2)
	for _, f := range m.Files {
		require.NotEmpty(t, f.MD5)
	}
	requireSame(t, mem, dir)
}
