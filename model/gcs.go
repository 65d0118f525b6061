package model

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// gcs reads a Google Cloud Storage prefix through the JSON API. Credentials
// are an OAuth access token (GOOGLE_OAUTH_ACCESS_TOKEN, e.g. from
// `gcloud auth print-access-token`) or none for public buckets; HMAC users can
// equally use s3:// with the storage.googleapis.com endpoint.
type gcs struct {
	u        URI
	endpoint string
	token    string
	client   *http.Client
}

func newGCS(u URI, cfg Config) *gcs {
	ep := strings.TrimRight(envOr(cfg.GCSEndpoint, "STORAGE_EMULATOR_HOST"), "/")
	if ep == "" {
		ep = "https://storage.googleapis.com"
	} else if !strings.Contains(ep, "://") {
		ep = "http://" + ep // emulators are given as host:port
	}
	return &gcs{u: u, endpoint: ep, token: envOr(cfg.GCSToken, "GOOGLE_OAUTH_ACCESS_TOKEN"), client: httpClient(cfg.Workers)}
}

func (g *gcs) String() string { return g.u.String() }

func (g *gcs) get(ctx context.Context, u string, hdr map[string]string) (*http.Response, error) {
	return bearerGet(ctx, g.client, g.token, u, hdr)
}

func (g *gcs) List(ctx context.Context) ([]File, error) {
	prefix := ""
	if g.u.Prefix != "" {
		prefix = g.u.Prefix + "/"
	}
	var out []File
	token := ""
	for pages := 0; ; pages++ {
		if pages > 100000 {
			return nil, fmt.Errorf("gcs listing did not end")
		}
		q := url.Values{"prefix": {prefix}}
		if token != "" {
			q.Set("pageToken", token)
		}
		body, _, err := readPage(ctx, g.client, g.token, fmt.Sprintf("%s/storage/v1/b/%s/o?%s", g.endpoint, url.PathEscape(g.u.Bucket), q.Encode()))
		if err != nil {
			return nil, err
		}
		files, next, err := parseGCSList(body, prefix)
		if err != nil {
			return nil, err
		}
		out = append(out, files...)
		if next == "" {
			break
		}
		token = next
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: %w (no objects under the prefix)", g.u, ErrNotFound)
	}
	return out, nil
}

// parseGCSList decodes one page of objects.list.
func parseGCSList(body []byte, prefix string) ([]File, string, error) {
	var page struct {
		Items []struct {
			Name   string `json:"name"`
			Size   string `json:"size"`
			MD5    string `json:"md5Hash"`
			CRC32C string `json:"crc32c"`
			ETag   string `json:"etag"`
		} `json:"items"`
		NextPageToken string `json:"nextPageToken"`
	}
	if err := json.Unmarshal(body, &page); err != nil {
		return nil, "", fmt.Errorf("gcs listing is not the expected JSON: %w", err)
	}
	var out []File
	for _, it := range page.Items {
		rel, ok := strings.CutPrefix(it.Name, prefix)
		if !ok || rel == "" || strings.HasSuffix(rel, "/") {
			continue // the prefix itself or a folder placeholder
		}
		if err := safeRel(rel); err != nil {
			return nil, "", fmt.Errorf("gcs listing: %w", err)
		}
		size, err := strconv.ParseInt(it.Size, 10, 64)
		if err != nil || size < 0 {
			return nil, "", fmt.Errorf("gcs listing: %s has size %q", it.Name, it.Size)
		}
		f := File{Name: rel, Size: size, ETag: it.ETag}
		if b, err := base64.StdEncoding.DecodeString(it.MD5); err == nil && len(b) == 16 {
			f.MD5 = hex.EncodeToString(b)
		}
		if b, err := base64.StdEncoding.DecodeString(it.CRC32C); err == nil && len(b) == 4 {
			f.CRC32C = hex.EncodeToString(b)
		}
		out = append(out, f)
	}
	return out, page.NextPageToken, nil
}

func (g *gcs) Read(ctx context.Context, f File, off, n int64) (io.ReadCloser, error) {
	name := f.Name
	if g.u.Prefix != "" {
		name = g.u.Prefix + "/" + f.Name
	}
	u := fmt.Sprintf("%s/storage/v1/b/%s/o/%s?alt=media", g.endpoint, url.PathEscape(g.u.Bucket), url.PathEscape(name))
	return rangedGet(ctx, g.get, u, off, n)
}
