package model

import (
	"fmt"
	"net/url"
	"path"
	"strings"
)

// Scheme names a kind of source.
type Scheme string

// Schemes a model URI may use.
const (
	SchemeHF    Scheme = "hf"
	SchemeS3    Scheme = "s3"
	SchemeGCS   Scheme = "gs"
	SchemeLocal Scheme = "file"
)

// URI is a parsed model source.
type URI struct {
	Scheme Scheme
	// Bucket is the S3/GCS bucket, or the Hugging Face repository "org/name".
	Bucket string
	// Prefix is the key prefix inside the bucket, without slashes at either
	// end; empty means the whole bucket.
	Prefix string
	// Revision is the Hugging Face branch, tag or commit ("main" when unset).
	Revision string
	// Path is the directory of a local source.
	Path string
	raw  string
}

func (u URI) String() string { return u.raw }

// Name is the directory name a pull uses under a models directory: the last
// segment of the prefix (s3://b/models/deepseek-r1 → deepseek-r1, as AIBrix's
// downloader does), the bucket when there is no prefix, the repository name
// for Hugging Face (with "@revision" when one was given).
func (u URI) Name() string {
	switch u.Scheme {
	case SchemeHF:
		n := path.Base(u.Bucket)
		if u.Revision != "main" {
			// Branches may hold '/' (pr/12): one directory, never nested ones.
			n += "@" + strings.ReplaceAll(u.Revision, "/", "--")
		}
		return n
	case SchemeLocal:
		return path.Base(u.Path)
	}
	if u.Prefix != "" {
		return path.Base(u.Prefix)
	}
	return u.Bucket
}

// ParseURI parses a model source. Errors say what form was expected.
func ParseURI(s string) (URI, error) {
	u := URI{raw: s}
	bad := func(format string, a ...any) (URI, error) {
		return URI{}, fmt.Errorf("model source %q: %s", s, fmt.Sprintf(format, a...))
	}
	if strings.ContainsAny(s, "\x00\r\n\t") {
		return bad("contains control characters")
	}
	switch {
	case strings.HasPrefix(s, "/"):
		u.Scheme, u.Path = SchemeLocal, path.Clean(s)
		return u, nil
	case strings.HasPrefix(s, "file://"):
		p := strings.TrimPrefix(s, "file://")
		if !strings.HasPrefix(p, "/") {
			return bad("file:// needs an absolute path (file:///mnt/models/x)")
		}
		u.Scheme, u.Path = SchemeLocal, path.Clean(p)
		return u, nil
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return bad("want hf://org/name[@revision], s3://bucket/prefix, gs://bucket/prefix, or an absolute path")
	}
	switch Scheme(scheme) {
	case SchemeHF:
		repo, rev, hasRev := strings.Cut(rest, "@")
		if hasRev && rev == "" {
			return bad("empty revision after @")
		}
		if !hasRev {
			rev = "main"
		}
		parts := strings.Split(repo, "/")
		if len(parts) != 2 || !validName(parts[0]) || !validName(parts[1]) {
			return bad("want hf://org/name[@revision] (letters, digits, '-', '_', '.')")
		}
		if !validRevision(rev) {
			return bad("revision %q is not a branch, tag or commit", rev)
		}
		u.Scheme, u.Bucket, u.Revision = SchemeHF, repo, rev
		return u, nil
	case SchemeS3, SchemeGCS:
		bucket, prefix, _ := strings.Cut(rest, "/")
		if bucket == "" {
			return bad("no bucket after %s://", scheme)
		}
		if !validBucket(bucket) {
			return bad("bucket %q is not a valid bucket name (3-63 of a-z, 0-9, '.', '-', '_')", bucket)
		}
		prefix = strings.Trim(prefix, "/")
		for _, seg := range strings.Split(prefix, "/") {
			if seg == ".." || seg == "." || (seg == "" && prefix != "") {
				return bad("prefix %q has an empty, '.' or '..' segment", prefix)
			}
		}
		u.Scheme, u.Bucket, u.Prefix = Scheme(scheme), bucket, prefix
		return u, nil
	}
	if _, err := url.Parse(s); err != nil {
		return bad("%v", err)
	}
	return bad("unsupported scheme %q; use hf://, s3://, gs:// or a path", scheme)
}

func validName(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > 96 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// validRevision accepts branch names with slashes (refs like "pr/12" are
// legal on the Hub) but nothing that could escape a URL path.
func validRevision(s string) bool {
	for _, seg := range strings.Split(s, "/") {
		if !validName(seg) {
			return false
		}
	}
	return true
}

func validBucket(s string) bool {
	if len(s) < 3 || len(s) > 63 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

// safeRel checks a file name from a listing before it becomes a local path:
// relative, clean, inside the model directory, and not our own .shoal tree.
func safeRel(name string) error {
	if name == "" || strings.HasPrefix(name, "/") || strings.ContainsAny(name, "\x00\\") {
		return fmt.Errorf("file name %q is not a relative path", name)
	}
	if path.Clean(name) != name {
		return fmt.Errorf("file name %q is not clean", name)
	}
	for _, seg := range strings.Split(name, "/") {
		if seg == ".." || seg == "." {
			return fmt.Errorf("file name %q leaves the model directory", name)
		}
	}
	if name == stateDir || strings.HasPrefix(name, stateDir+"/") {
		return fmt.Errorf("file name %q collides with shoal's own %s directory", name, stateDir)
	}
	return nil
}
