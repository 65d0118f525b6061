package model

import (
	"strings"
	"testing"
)

// Parsers of user input (URIs) and of remote listings must reject garbage
// with an error, never panic, and never yield a name outside the model dir.

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"hf://org/name", "hf://o/m@rev", "s3://bucket/a/b", "gs://b/x/", "/mnt/m", "file:///x", "s3://", "hf://a/b@", "s3://bkt/../x", "hf://0/0@0/0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !strings.Contains(err.Error(), "model source") {
				t.Fatalf("error does not name the input: %v", err)
			}
			return
		}
		name := u.Name()
		if name == "" || name == ".." || strings.Contains(name, "/") && u.Scheme != SchemeLocal {
			t.Fatalf("%q gives directory name %q", s, name)
		}
		if strings.Contains(u.Prefix, "..") && strings.Contains("/"+u.Prefix+"/", "/../") {
			t.Fatalf("%q keeps a '..' prefix segment", s)
		}
	})
}

func checkNames(t *testing.T, files []File) {
	for _, f := range files {
		if err := safeRel(f.Name); err != nil {
			t.Fatalf("listing yielded unsafe name %q", f.Name)
		}
		if f.Size < 0 {
			t.Fatalf("negative size for %q", f.Name)
		}
	}
}

func FuzzParseHFTree(f *testing.F) {
	f.Add([]byte(`[{"type":"file","path":"config.json","size":12,"oid":"0123456789012345678901234567890123456789"}]`))
	f.Add([]byte(`[{"type":"file","path":"a.safetensors","size":134,"lfs":{"oid":"` + strings.Repeat("a", 64) + `","size":99}}]`))
	f.Add([]byte(`[{"type":"directory","path":"sub"}]`))
	f.Add([]byte(`[{"type":"file","path":"../x"}]`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		files, err := parseHFTree(b)
		if err == nil {
			checkNames(t, files)
		}
	})
}

func FuzzParseGCSList(f *testing.F) {
	f.Add([]byte(`{"items":[{"name":"p/config.json","size":"12","md5Hash":"XrY7u+Ae7tCTyyK7j1rNww=="}],"nextPageToken":"x"}`), "p/")
	f.Add([]byte(`{"items":[{"name":"p/../x","size":"1"}]}`), "p/")
	f.Add([]byte(`{"items":[{"name":"p/a","size":"-1"}]}`), "p/")
	f.Fuzz(func(t *testing.T, b []byte, prefix string) {
		files, _, err := parseGCSList(b, prefix)
		if err == nil {
			checkNames(t, files)
		}
	})
}

func FuzzS3Key(f *testing.F) {
	f.Add("m/config.json", "m/", int64(3), `"5eb63bbbe01eeed093cb22bb8f5acdc3"`)
	f.Add("m/a/../../b", "m/", int64(3), `"x-2"`)
	f.Add("m/", "m/", int64(0), "")
	f.Fuzz(func(t *testing.T, key, prefix string, size int64, etag string) {
		fl, ok, err := s3File(key, prefix, size, etag)
		if err == nil && ok {
			checkNames(t, []File{fl})
		}
	})
}
