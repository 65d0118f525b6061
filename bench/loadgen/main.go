// Command loadgen drives an OpenAI endpoint at a fixed concurrency for a
// fixed time and prints requests/s and latency percentiles as one JSON line.
// The same binary measures every target in a benchmark run.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	url := flag.String("url", "", "endpoint(s), comma-separated: clients take them in turn")
	conc := flag.Int("c", 32, "concurrent clients")
	dur := flag.Duration("d", 10*time.Second, "duration")
	promptBytes := flag.Int("prompt-bytes", 64, "prompt size in bytes")
	model := flag.String("model", "m", "model")
	name := flag.String("name", "", "label for the output")
	flag.Parse()
	if *url == "" {
		fmt.Fprintln(os.Stderr, "loadgen: -url is required")
		os.Exit(2)
	}
	body, _ := json.Marshal(map[string]any{"model": *model, "prompt": strings.Repeat("x", *promptBytes), "max_tokens": 1})
	tr := &http.Transport{MaxIdleConnsPerHost: *conc * 2, DialContext: (&net.Dialer{Timeout: 2 * time.Second}).DialContext}
	client := &http.Client{Transport: tr, Timeout: 60 * time.Second}
	var ok, fail atomic.Int64
	var mu sync.Mutex
	var lats []time.Duration
	stop := time.Now().Add(*dur)
	var wg sync.WaitGroup
	urls := strings.Split(*url, ",")
	for i := 0; i < *conc; i++ {
		wg.Add(1)
		target := urls[i%len(urls)]
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(stop) {
				t0 := time.Now()
				resp, err := client.Post(target, "application/json", bytes.NewReader(body))
				if err != nil {
					fail.Add(1)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					fail.Add(1)
					continue
				}
				ok.Add(1)
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	pct := func(p float64) float64 {
		if len(lats) == 0 {
			return 0
		}
		return float64(lats[int(p*float64(len(lats)-1))].Microseconds()) / 1000
	}
	out, _ := json.Marshal(map[string]any{"name": *name, "rps": float64(ok.Load()) / dur.Seconds(), "ok": ok.Load(), "fail": fail.Load(),
		"p50_ms": pct(0.50), "p99_ms": pct(0.99)})
	fmt.Println(string(out))
}
