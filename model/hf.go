package model

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
)

// hf reads a Hugging Face repository through the Hub's HTTP API: the revision
// is resolved to a commit once, so every file comes from one snapshot.
type hf struct {
	u        URI
	endpoint string
	token    string
	client   *http.Client
	commit   string
}

func newHF(u URI, cfg Config) *hf {
	ep := strings.TrimRight(envOr(envOr(cfg.HFEndpoint, "HF_ENDPOINT"), ""), "/")
	if ep == "" {
		ep = "https://huggingface.co"
	}
	tok := envOr(cfg.HFToken, "HF_TOKEN")
	if tok == "" {
		tok = envOr("", "HUGGING_FACE_HUB_TOKEN")
	}
	return &hf{u: u, endpoint: ep, token: tok, client: httpClient(cfg.Workers)}
}

func (h *hf) String() string { return h.u.String() }

func (h *hf) get(ctx context.Context, u string, hdr map[string]string) (*http.Response, error) {
	return bearerGet(ctx, h.client, h.token, u, hdr)
}

func escapePath(p string) string {
	segs := strings.Split(p, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return strings.Join(segs, "/")
}

func (h *hf) resolve(ctx context.Context) error {
	if h.commit != "" {
		return nil
	}
	resp, err := h.get(ctx, fmt.Sprintf("%s/api/models/%s/revision/%s", h.endpoint, escapePath(h.u.Bucket), escapePath(h.u.Revision)), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var info struct {
		SHA string `json:"sha"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&info); err != nil {
		return fmt.Errorf("hub revision answer: %w", err)
	}
	if !isHex(info.SHA, 40) {
		return fmt.Errorf("hub revision answer has no commit sha (got %q)", info.SHA)
	}
	h.commit = info.SHA
	return nil
}

func (h *hf) List(ctx context.Context) ([]File, error) {
	if err := h.resolve(ctx); err != nil {
		return nil, err
	}
	next := fmt.Sprintf("%s/api/models/%s/tree/%s?recursive=true", h.endpoint, escapePath(h.u.Bucket), h.commit)
	var out []File
	for pages := 0; next != ""; pages++ {
		if pages > 10000 {
			return nil, fmt.Errorf("hub listing did not end after %d pages", pages)
		}
		body, hdr, err := readPage(ctx, h.client, h.token, next)
		if err != nil {
			return nil, err
		}
		files, err := parseHFTree(body)
		if err != nil {
			return nil, err
		}
		out = append(out, files...)
		next = nextLink(hdr.Get("Link"))
		if next != "" {
			// The next page must stay on the Hub we asked.
			nu, err := url.Parse(next)
			base, _ := url.Parse(h.endpoint)
			if err != nil || nu.Host != base.Host {
				return nil, fmt.Errorf("hub listing points to another host: %q", next)
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s@%s: %w (no files)", h.u.Bucket, h.u.Revision, ErrNotFound)
	}
	return out, nil
}

// parseHFTree decodes one page of /api/models/{repo}/tree/{rev}: files with
// size, git oid and, for LFS files, the sha256 of the content.
func parseHFTree(body []byte) ([]File, error) {
	var entries []struct {
		Type string `json:"type"`
		Path string `json:"path"`
		Size int64  `json:"size"`
		OID  string `json:"oid"`
		LFS  *struct {
			OID  string `json:"oid"`
			Size int64  `json:"size"`
		} `json:"lfs"`
	}
	if err := json.Unmarshal(body, &entries); err != nil {
		return nil, fmt.Errorf("hub tree listing is not the expected JSON array: %w", err)
	}
	var out []File
	for _, e := range entries {
		if e.Type != "file" {
			continue
		}
		if err := safeRel(e.Path); err != nil {
			return nil, fmt.Errorf("hub listing: %w", err)
		}
		f := File{Name: e.Path, Size: e.Size}
		if e.LFS != nil {
			f.Size = e.LFS.Size
			if !isHex(e.LFS.OID, 64) {
				return nil, fmt.Errorf("hub listing: %s has a malformed LFS sha256 %q", e.Path, e.LFS.OID)
			}
			f.SHA256 = strings.ToLower(e.LFS.OID)
		} else if isHex(e.OID, 40) {
			f.GitSHA1 = strings.ToLower(e.OID)
		}
		if f.Size < 0 {
			return nil, fmt.Errorf("hub listing: %s has a negative size", e.Path)
		}
		f.ETag = f.SHA256 + f.GitSHA1
		out = append(out, f)
	}
	return out, nil
}

var linkNext = regexp.MustCompile(`<([^>]+)>\s*;\s*rel="?next"?`)

func nextLink(h string) string {
	if m := linkNext.FindStringSubmatch(h); m != nil {
		return m[1]
	}
	return ""
}

func (h *hf) Read(ctx context.Context, f File, off, n int64) (io.ReadCloser, error) {
	if err := h.resolve(ctx); err != nil {
		return nil, err
	}
	u := fmt.Sprintf("%s/%s/resolve/%s/%s", h.endpoint, escapePath(h.u.Bucket), h.commit, escapePath(f.Name))
	return rangedGet(ctx, h.get, u, off, n)
}

// rangedGet asks for [off, off+n) and insists on getting exactly that.
func rangedGet(ctx context.Context, get func(context.Context, string, map[string]string) (*http.Response, error), u string, off, n int64) (io.ReadCloser, error) {
	resp, err := get(ctx, u, map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", off, off+n-1), "Accept-Encoding": "identity"})
	if err != nil {
		return nil, err
	}
	switch {
	case resp.StatusCode == http.StatusPartialContent:
	case resp.StatusCode == http.StatusOK && off == 0 && resp.ContentLength == n:
	default:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: asked for bytes %d-%d, got %d with %d bytes (server ignores Range?)", u, off, off+n-1, resp.StatusCode, resp.ContentLength)
	}
	return &exactReader{rc: resp.Body, left: n}, nil
}

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}
