package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/engine/sim"
)

// BenchmarkPDWarmPairs measures the first request of a new
// prefill/decode pair through the router: with the connector's lazy
// handshake (what vLLM's proxy and llm-d leave to the first request) and
// with shoal's warm pairs (the router runs the handshake before it takes
// traffic). Simulated NixlConnector engines with vLLM's ~5 s handshake, at
// 10× speed (so 0.5 s real); medians of 5 fresh pairs each.
//
//	go test -run '^$' -bench PDWarmPairs -benchtime 1x ./bench/
func BenchmarkPDWarmPairs(b *testing.B) {
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		os.Setenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS", "5")
		defer os.Unsetenv("SHOAL_SIM_NIXL_HANDSHAKE_SECONDS")
		var lazy, warm []time.Duration
		for trial := 0; trial < 5; trial++ {
			for _, w := range []bool{false, true} {
				d, err := firstRequest(w, trial)
				if err != nil {
					b.Fatal(err)
				}
				if w {
					warm = append(warm, d)
				} else {
					lazy = append(lazy, d)
				}
			}
		}
		med := func(xs []time.Duration) time.Duration {
			sort.Slice(xs, func(i, j int) bool { return xs[i] < xs[j] })
			return xs[len(xs)/2]
		}
		l, w := med(lazy), med(warm)
		fmt.Fprintf(os.Stdout, "\nfirst request of a new prefill/decode pair (simulated NIXL, 5 s handshake at 10× speed, median of 5):\n")
		fmt.Fprintf(os.Stdout, "lazy handshake %v   warm pairs %v   ratio %.1f× (real time; ×10 for the engines' time)\n",
			l.Round(time.Millisecond), w.Round(time.Millisecond), float64(l)/float64(w))
	}
}

// firstRequest builds a fresh pair, optionally warms it, and times one
// request through the router.
func firstRequest(warm bool, trial int) (time.Duration, error) {
	pr := sim.Presets["llama-8b-h100-tp1"]
	var eps []*router.Endpoint
	var stops []func()
	defer func() {
		for _, s := range stops {
			s()
		}
	}()
	for k, role := range []string{router.RolePrefill, router.RoleDecode} {
		s := sim.NewServer("m", pr.Params, 10)
		ip := fmt.Sprintf("127.0.10.%d", 10+trial*4+k+map[bool]int{false: 0, true: 2}[warm])
		l, err := net.Listen("tcp", ip+":0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if err := s.EnableNIXL(pr, ip, port, "fail"); err != nil {
			return 0, err
		}
		ctx, cancel := context.WithCancel(context.Background())
		go s.Run(ctx)
		hs := httptest.NewServer(s.Handler())
		stops = append(stops, func() { hs.Close(); cancel(); s.Close() })
		eps = append(eps, &router.Endpoint{Model: "m", Addr: strings.TrimPrefix(hs.URL, "http://"), Group: role, Role: role, Rank: -1})
	}
	tb := router.NewTable()
	tb.Set(router.NewSnapshot([]string{"m"}, eps))
	r := router.New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), router.Config{})
	if warm {
		if _, errs := r.WarmPairs(context.Background(), eps); len(errs) > 0 {
			return 0, errs[0]
		}
	}
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	body := `{"model":"m","messages":[{"role":"user","content":"` + strings.Repeat("a first question for a new pair ", 10) + `"}],"max_tokens":1}`
	start := time.Now()
	resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	return time.Since(start), nil
}
