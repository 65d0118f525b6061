package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestStandaloneRouterStopsSendingToADrainingHead: a scale-in drains a
// replica; a standalone router (which has no store) hears it from the
// head's Replica stream and sends it no new request within 1 s, while a
// stream already running on it completes.
func TestStandaloneRouterStopsSendingToADrainingHead(t *testing.T) {
	e := startCluster(t, 27, 4)
	e.apply("two.yaml", spec2x2)
	listen := e.startRouter("127.0.27.1")
	hc := &http.Client{Timeout: 30 * time.Second}
	send := func() (string, error) {
		r, err := hc.Post("http://"+listen+"/v1/completions", "application/json",
			strings.NewReader(`{"model":"demo","prompt":"p","max_tokens":2,"ignore_eos":true}`))
		if err != nil {
			return "", err
		}
		defer r.Body.Close()
		_, _ = io.Copy(io.Discard, r.Body)
		if r.StatusCode != 200 {
			return "", fmt.Errorf("status %d", r.StatusCode)
		}
		return r.Header.Get("X-Shoal-Replica"), nil
	}
	require.Eventually(t, func() bool {
		seen := map[string]bool{}
		for i := 0; i < 8; i++ {
			g, err := send()
			if err != nil {
				return false
			}
			seen[g] = true
		}
		return len(seen) == 2
	}, 90*time.Second, 250*time.Millisecond, "the standalone router reaches both replicas")

	// Long streams on both replicas, running when the drain begins.
	type streamResult struct {
		group  string
		events int
		done   bool
		err    error
	}
	var wg sync.WaitGroup
	results := make([]streamResult, 4)
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := hc.Post("http://"+listen+"/v1/completions", "application/json",
				strings.NewReader(`{"model":"demo","prompt":"long","max_tokens":120,"ignore_eos":true,"stream":true}`))
			if err != nil {
				results[i].err = err
				return
			}
			defer r.Body.Close()
			results[i].group = r.Header.Get("X-Shoal-Replica")
			sc := bufio.NewScanner(r.Body)
			for sc.Scan() {
				switch line := sc.Text(); {
				case line == "data: [DONE]":
					results[i].done = true
				case strings.HasPrefix(line, "data: "):
					results[i].events++
				}
			}
			results[i].err = sc.Err()
		}(i)
	}
	time.Sleep(300 * time.Millisecond)
	e.apply("one.yaml", strings.Replace(spec2x2, "count: 2", "count: 1", 1))
	drained := time.Now()
	var drainedGroup string
	require.Eventually(t, func() bool {
		for _, r := range e.replicas() {
			if r.State == "draining" {
				drainedGroup = r.GroupID
				return true
			}
		}
		return false
	}, 10*time.Second, 20*time.Millisecond)

	var last time.Time // the last new request the drained group received
	for time.Since(drained) < 3*time.Second {
		start := time.Now()
		g, err := send()
		require.NoError(t, err, "the other replica keeps serving")
		if g == drainedGroup {
			last = start
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !last.IsZero() {
		t.Logf("the drained replica got its last new request %.2fs after the scale-in", last.Sub(drained).Seconds())
	}
	require.True(t, last.IsZero() || last.Sub(drained) < time.Second,
		"the standalone router sent the draining replica new requests %.2fs after the scale-in", last.Sub(drained).Seconds())
	wg.Wait()
	onDrained := 0
	for _, r := range results {
		require.NoError(t, r.err)
		require.True(t, r.done, "a stream on %s ended early (%d events)", r.group, r.events)
		require.GreaterOrEqual(t, r.events, 120, "every token of the stream arrived")
		if r.group == drainedGroup {
			onDrained++
		}
	}
	t.Logf("%d of %d streams ran on the drained replica and completed", onDrained, len(results))
	require.Eventually(t, func() bool { return len(e.replicas()) == 1 }, 3*time.Minute, 250*time.Millisecond,
		"the drained replica is released once idle")
}
