package model

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

// File is one object of a source listing.
type File struct {
	// Name is the path relative to the model directory.
	Name string `json:"name"`
	Size int64  `json:"size"`
	// ETag is the source's opaque version tag, recorded so a resumed pull
	// can tell that the object did not change underneath it.
	ETag string `json:"etag,omitempty"`
	// Digests the source vouches for, hex encoded; any may be empty.
	MD5     string `json:"md5,omitempty"`
	SHA256  string `json:"sha256,omitempty"`
	GitSHA1 string `json:"git_sha1,omitempty"` // git blob hash (Hugging Face non-LFS files)
	CRC32C  string `json:"crc32c,omitempty"`
}

// Source lists a model's files and reads byte ranges of them.
type Source interface {
	// List returns every file under the source; names pass safeRel.
	List(ctx context.Context) ([]File, error)
	// Read returns bytes [off, off+n) of f. The reader must yield exactly n
	// bytes or an error.
	Read(ctx context.Context, f File, off, n int64) (io.ReadCloser, error)
	// String names the source in logs.
	String() string
}

// Config holds the endpoints and credentials sources use. Empty fields come
// from the environment (AWS_*, HF_TOKEN, HF_ENDPOINT, GOOGLE_OAUTH_ACCESS_TOKEN,
// STORAGE_EMULATOR_HOST) and then from the services' defaults.
type Config struct {
	S3Endpoint  string // AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
	S3Region    string // AWS_REGION; us-east-1 when unset everywhere
	S3PathStyle *bool  // default: path style when an endpoint is set
	S3Profile   string // AWS_PROFILE
	HFEndpoint  string // HF_ENDPOINT; https://huggingface.co
	HFToken     string // HF_TOKEN
	GCSEndpoint string // STORAGE_EMULATOR_HOST; https://storage.googleapis.com
	GCSToken    string // GOOGLE_OAUTH_ACCESS_TOKEN
	// Workers sizes the HTTP connection pool.
	Workers int
}

// ErrNotFound is wrapped when a source has no files under its URI.
var ErrNotFound = errors.New("model not found")

// Open returns the source for a remote URI. Local paths have no Source: use
// Check on them.
func Open(ctx context.Context, u URI, cfg Config) (Source, error) {
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	switch u.Scheme {
	case SchemeS3:
		return newS3(ctx, u, cfg)
	case SchemeHF:
		return newHF(u, cfg), nil
	case SchemeGCS:
		return newGCS(u, cfg), nil
	}
	return nil, fmt.Errorf("%s is a local path; it is used in place", u)
}

func envOr(v, key string) string {
	if v != "" {
		return v
	}
	return os.Getenv(key)
}

// httpClient is tuned for many long ranged GETs to one host: a connection per
// worker kept alive, no transparent gzip (weights do not compress, and a
// gzip-encoded range would not be byte-exact), large socket buffers.
func httpClient(workers int) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	tuneTransport(t, workers)
	return &http.Client{Transport: t}
}

func tuneTransport(t *http.Transport, workers int) {
	t.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	t.MaxIdleConns = 2 * workers
	t.MaxIdleConnsPerHost = 2 * workers
	t.MaxConnsPerHost = 0
	t.IdleConnTimeout = 90 * time.Second
	t.TLSHandshakeTimeout = 10 * time.Second
	t.ResponseHeaderTimeout = 60 * time.Second
	t.DisableCompression = true
	t.ReadBufferSize = 256 << 10
	t.WriteBufferSize = 64 << 10
	// One TCP stream per part: HTTP/2 would multiplex them onto one connection.
	t.ForceAttemptHTTP2 = false
	t.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
}

// httpError is a non-2xx answer; Retry says whether trying again may help.
type httpError struct {
	Status int
	Body   string
	URL    string
}

func (e *httpError) Error() string {
	msg := fmt.Sprintf("GET %s: %d %s", e.URL, e.Status, http.StatusText(e.Status))
	if e.Body != "" {
		msg += ": " + e.Body
	}
	switch e.Status {
	case 401, 403:
		msg += " (check credentials: HF_TOKEN, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, GOOGLE_OAUTH_ACCESS_TOKEN)"
	case 404:
		msg += " (check the bucket, prefix, repository and revision)"
	}
	return msg
}

func (e *httpError) retryable() bool {
	return e.Status == 408 || e.Status == 429 || e.Status >= 500
}

// bearerGet is a GET with an optional bearer token; a non-2xx answer is an
// *httpError carrying the start of the body.
func bearerGet(ctx context.Context, c *http.Client, token, u string, hdr map[string]string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, &httpError{Status: resp.StatusCode, Body: readErrBody(resp.Body), URL: u}
	}
	return resp, nil
}

// readPage fetches one page of a listing (bounded to 64 MiB) and its headers.
func readPage(ctx context.Context, c *http.Client, token, u string) ([]byte, http.Header, error) {
	resp, err := bearerGet(ctx, c, token, u, nil)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return body, resp.Header, err
}

func readErrBody(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, 512))
	return string(b)
}

// exactReader fails a body that ends before n bytes, so a cut connection is
// never mistaken for a complete part.
type exactReader struct {
	rc   io.ReadCloser
	left int64
}

func (r *exactReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n, err := r.rc.Read(p)
	r.left -= int64(n)
	if err == io.EOF && r.left > 0 {
		return n, io.ErrUnexpectedEOF
	}
	if err == io.EOF {
		return n, nil // the next Read reports EOF
	}
	return n, err
}

func (r *exactReader) Close() error { return r.rc.Close() }
