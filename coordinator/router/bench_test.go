package router

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// BenchmarkProxy measures the router's own cost per request over real HTTP
// on loopback, against an instant backend.
func BenchmarkProxy(b *testing.B) {
	for _, front := range []string{"server", "nethttp"} {
		for _, size := range []int{64, 200 << 10} {
			b.Run(front+"/"+map[int]string{64: "short", 200 << 10: "200KB"}[size], func(b *testing.B) {
				be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					_, _ = io.Copy(io.Discard, r.Body)
					w.Header().Set("Content-Type", "application/json")
					_, _ = io.WriteString(w, `{"id":"x","object":"text_completion","choices":[{"index":0,"text":" a","finish_reason":"length"}]}`)
				}))
				defer be.Close()
				tb := NewTable()
				tb.Set(NewSnapshot(nil, []*Endpoint{{Model: "m", Addr: strings.TrimPrefix(be.URL, "http://")}}))
				r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{})
				var url string
				if front == "server" { // what shoal router and the coordinator serve with
					ln, err := net.Listen("tcp", "127.0.0.1:0")
					if err != nil {
						b.Fatal(err)
					}
					s := r.NewServer(ln)
					go func() { _ = s.Serve() }()
					defer s.Close()
					url = "http://" + ln.Addr().String()
				} else {
					rt := httptest.NewServer(r.Handler())
					defer rt.Close()
					url = rt.URL
				}
				body := []byte(`{"model":"m","prompt":"` + strings.Repeat("x", size) + `","max_tokens":1}`)
				c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
				b.SetBytes(int64(len(body)))
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						resp, err := c.Post(url+"/v1/completions", "application/json", bytes.NewReader(body))
						if err != nil {
							b.Fatal(err)
						}
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				})
			})
		}
	}
}
