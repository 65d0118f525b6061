package chaos

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestLoadClassifiesOutcomes: the load generator counts a stream cut before
// [DONE], an error status and a refused connection as failures, and reads
// the router's headers.
func TestLoadClassifiesOutcomes(t *testing.T) {
	mode := "ok"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Shoal-Replica", "g1")
		w.Header().Set("X-Shoal-Epoch", "3")
		w.Header().Set("X-Shoal-Term", "7")
		switch mode {
		case "ok":
			_, _ = w.Write([]byte("data: {}\n\ndata: [DONE]\n\n"))
		case "cut":
			_, _ = w.Write([]byte("data: {}\n\n"))
			w.(http.Flusher).Flush()
			hj, _ := w.(http.Hijacker)
			c, _, _ := hj.Hijack()
			c.Close()
		case "aborted":
			_, _ = w.Write([]byte("data: {}\n\ndata: {\"error\": {\"message\": \"aborted\"}}\n\ndata: [DONE]\n\n"))
		case "503":
			w.WriteHeader(503)
			_, _ = w.Write([]byte(`{"error":{"message":"no replica"}}`))
		}
	}))
	l := NewLoad(strings.TrimPrefix(srv.URL, "http://"))
	for _, m := range []string{"ok", "cut", "503", "aborted"} {
		mode = m
		l.one(context.Background(), true)
	}
	srv.Close()
	l.one(context.Background(), false) // refused
	rs := l.Since(time.Time{})
	require.Len(t, rs, 5)
	require.True(t, rs[0].OK)
	require.Equal(t, "g1", rs[0].Group)
	require.Equal(t, uint64(3), rs[0].Epoch)
	require.Equal(t, uint64(7), rs[0].Term)
	require.False(t, rs[1].OK, "a stream cut before [DONE] failed")
	require.True(t, rs[1].Bytes)
	require.False(t, rs[2].OK)
	require.Equal(t, 503, rs[2].Status)
	require.False(t, rs[3].OK, "an error event before [DONE] is a failure")
	require.False(t, rs[4].OK)
	require.Zero(t, rs[4].Status)
}

// TestWatchFindsTwoHeads: the sampler reports two live head engines of one
// group (invariant 1) and a request sent to a superseded term (invariant 2).
func TestWatchFindsTwoHeads(t *testing.T) {
	dir := t.TempDir()
	self := os.Getpid() // a live process stands in for both engines
	line := func(node string, term int, pid int) string {
		return "time=2026-11-28T10:00:00.000Z level=INFO msg=\"engine process started\" component=agent node=" + node +
			" group=g1 epoch=1 term=" + itoa(term) + " role=head name=vllm runtime=process pid=" + itoa(pid) + " argv=\"vllm serve\"\n"
	}
	require.NoError(t, os.WriteFile(dir+"/a.log", []byte(line("a", 1, self)+
		"time=2026-11-28T10:00:00.000Z level=INFO msg=\"claimed head\" component=agent node=a group=g1 epoch=1 term=1\n"), 0o644))
	require.NoError(t, os.WriteFile(dir+"/b.log", []byte(line("b", 2, self+0)+
		"time=2026-11-28T10:00:05.000Z level=INFO msg=\"claimed head\" component=agent node=b group=g1 epoch=1 term=2\n"), 0o644))
	w := NewWatch(func() map[string]string { return map[string]string{"a": dir + "/a.log", "b": dir + "/b.log"} })
	w.scan()
	require.Len(t, w.engines, 1, "both logs name this pid; the later line wins")
	// Give b a live head engine of its own: a child process.
	child := exec.Command("sleep", "30")
	require.NoError(t, child.Start())
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	w.engines[self] = headEngine{node: "a", group: "g1", epoch: 1, term: 1, pid: self}
	w.engines[child.Process.Pid] = headEngine{node: "b", group: "g1", epoch: 1, term: 2, pid: child.Process.Pid}
	w.sample()
	require.Len(t, w.Dual(), 1, "two nodes with a running head engine of g1")
	require.Contains(t, w.Dual()[0], "a(epoch 1 term 1")
	// Once b's engine is gone, the next sample finds one head.
	_ = child.Process.Kill()
	_ = child.Wait()
	w.sample()
	require.Len(t, w.Dual(), 1)
	require.False(t, w.ExitedAt(child.Process.Pid).IsZero(), "the sampler saw the engine exit")
	at := func(s string) time.Time { v, _ := time.Parse(time.RFC3339, s); return v }
	bad := w.Superseded([]Req{
		{Start: at("2026-11-28T10:00:05Z"), Group: "g1", Epoch: 1, Term: 1}, // within the 1 s slack
		{Start: at("2026-11-28T10:00:07Z"), Group: "g1", Epoch: 1, Term: 1}, // superseded 2 s before
		{Start: at("2026-11-28T10:00:07Z"), Group: "g1", Epoch: 1, Term: 2}, // the newest
	}, time.Second)
	require.Len(t, bad, 1)
	require.Contains(t, bad[0], "superseded by epoch 1 term 2")
}

func itoa(i int) string { return strconv.Itoa(i) }
