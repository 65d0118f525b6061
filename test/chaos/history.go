package chaos

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/engine/process"
)

// Req is one request the load generator sent, and what became of it.
type Req struct {
	Start, End time.Time
	Stream     bool
	Status     int    // HTTP status; 0 when no response
	Err        string // transport or stream error
	OK         bool   // 200 and, for a stream, [DONE] reached
	Bytes      bool   // the client received part of the body
	// Who served it, from the router's response headers.
	Group       string
	Epoch, Term uint64
	Head        string
}

// Load sends OpenAI completions (half of them streamed) through the router
// from a few workers and records every outcome with its times.
type Load struct {
	url    string
	client *http.Client
	mu     sync.Mutex
	reqs   []Req
}

// NewLoad targets the router at addr (host:port).
func NewLoad(addr string) *Load {
	tr := &http.Transport{MaxIdleConnsPerHost: 16, ResponseHeaderTimeout: 30 * time.Second}
	return &Load{url: "http://" + addr + "/v1/completions", client: &http.Client{Transport: tr, Timeout: 45 * time.Second}}
}

// Run sends with workers concurrent requests until ctx ends.
func (l *Load) Run(ctx context.Context, workers int) {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				l.one(ctx, (w+i)%2 == 0)
				select {
				case <-ctx.Done():
				case <-time.After(50 * time.Millisecond):
				}
			}
		}(w)
	}
	wg.Wait()
}

func (l *Load) one(ctx context.Context, stream bool) {
	r := Req{Start: time.Now(), Stream: stream}
	body := fmt.Sprintf(`{"model":"demo","prompt":"chaos %d","max_tokens":16,"ignore_eos":true,"stream":%v}`, r.Start.UnixNano()%1000, stream)
	req, _ := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodPost, l.url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := l.client.Do(req)
	if err != nil {
		r.Err = err.Error()
	} else {
		r.Status = resp.StatusCode
		r.Group, r.Head = resp.Header.Get("X-Shoal-Replica"), resp.Header.Get("X-Shoal-Head")
		r.Epoch, _ = strconv.ParseUint(resp.Header.Get("X-Shoal-Epoch"), 10, 64)
		r.Term, _ = strconv.ParseUint(resp.Header.Get("X-Shoal-Term"), 10, 64)
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		r.Bytes = len(b) > 0
		switch {
		case rerr != nil:
			r.Err = "body: " + rerr.Error()
		case resp.StatusCode != 200:
			r.Err = strings.TrimSpace(string(b))
		case stream && !strings.Contains(string(b), "data: [DONE]"):
			r.Err = "stream ended without [DONE]"
		case stream && strings.Contains(string(b), `data: {"error"`):
			// vLLM ends a stream it aborted with an error event, then [DONE].
			r.Err = "stream carried an error event"
		default:
			r.OK = true
		}
	}
	r.End = time.Now()
	l.mu.Lock()
	l.reqs = append(l.reqs, r)
	l.mu.Unlock()
}

// Since returns the records of requests that started at or after t.
func (l *Load) Since(t time.Time) []Req {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Req
	for _, r := range l.reqs {
		if !r.Start.Before(t) {
			out = append(out, r)
		}
	}
	return out
}

// headEngine is a head's engine process (vllm serve) as its agent logged it.
type headEngine struct {
	node, group string
	epoch, term uint64
	pid         int
}

// claim is a head claim, from the claimant's log.
type claim struct {
	at          time.Time
	group       string
	epoch, term uint64
}

// Watch reads the agents' logs and samples which head engines run. It
// checks invariant 1 (never two heads of one group running an engine) at
// every sample and keeps the head claims for invariant 2.
type Watch struct {
	logs func() map[string]string // node → agent log path
	mu   sync.Mutex
	// offsets of the logs already read.
	offsets map[string]int64
	engines map[int]headEngine
	claims  []claim
	// dual are invariant-1 violations: a sample where two nodes ran a head
	// engine of the same group.
	dual []string
	// exits: when each head engine pid was first seen not running.
	exits map[int]time.Time
}

// NewWatch watches the logs logs() names.
func NewWatch(logs func() map[string]string) *Watch {
	return &Watch{logs: logs, offsets: map[string]int64{}, engines: map[int]headEngine{}, exits: map[int]time.Time{}}
}

var (
	attrRE = regexp.MustCompile(`(\w+)=("[^"]*"|\S+)`)
)

func attrs(line string) map[string]string {
	m := map[string]string{}
	for _, kv := range attrRE.FindAllStringSubmatch(line, -1) {
		m[kv[1]] = strings.Trim(kv[2], `"`)
	}
	return m
}

// scan reads new log lines.
func (w *Watch) scan() {
	for node, path := range w.logs() {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		if _, err := f.Seek(w.offsets[node], io.SeekStart); err != nil {
			f.Close()
			continue
		}
		rd := bufio.NewReader(f)
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				break // a partial line is read again next time
			}
			w.offsets[node] += int64(len(line))
			if !strings.Contains(line, `msg="engine process started"`) && !strings.Contains(line, `msg="claimed head"`) {
				continue
			}
			a := attrs(line)
			epoch, _ := strconv.ParseUint(a["epoch"], 10, 64)
			term, _ := strconv.ParseUint(a["term"], 10, 64)
			if strings.Contains(line, `msg="claimed head"`) {
				at, _ := time.Parse(time.RFC3339Nano, a["time"])
				w.claims = append(w.claims, claim{at: at, group: a["group"], epoch: epoch, term: term})
				continue
			}
			if a["role"] != "head" || (a["name"] != "vllm" && a["name"] != "engine") {
				continue
			}
			pid, _ := strconv.Atoi(a["pid"])
			w.engines[pid] = headEngine{node: node, group: a["group"], epoch: epoch, term: term, pid: pid}
		}
		f.Close()
	}
}

// Run samples every 50 ms until ctx ends.
func (w *Watch) Run(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		w.sample()
	}
}

func (w *Watch) sample() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scan()
	now := time.Now()
	running := map[string]map[string]headEngine{}
	for pid, e := range w.engines {
		if !runningProc(pid) {
			if _, ok := w.exits[pid]; !ok {
				w.exits[pid] = now
			}
			continue
		}
		if running[e.group] == nil {
			running[e.group] = map[string]headEngine{}
		}
		running[e.group][e.node] = e
	}
	for g, nodes := range running {
		if len(nodes) > 1 {
			var d []string
			for _, e := range nodes {
				d = append(d, fmt.Sprintf("%s(epoch %d term %d pid %d)", e.node, e.epoch, e.term, e.pid))
			}
			sort.Strings(d)
			w.dual = append(w.dual, fmt.Sprintf("%s: group %s has head engines on %s", now.Format("15:04:05.000"), g, strings.Join(d, ", ")))
		}
	}
}

// runningProc: the process exists, is not a zombie and is not stopped
// (SIGSTOP): it could be computing.
func runningProc(pid int) bool {
	st, err := process.State(pid)
	return err == nil && st != 'Z' && st != 'X' && st != 'T' && st != 't'
}

// Dual returns invariant-1 violations so far.
func (w *Watch) Dual() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.dual...)
}

// HeadEngines returns the running head engines, by group.
func (w *Watch) HeadEngines() []headEngine {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scan()
	var out []headEngine
	for pid, e := range w.engines {
		if runningProc(pid) {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].group < out[j].group })
	return out
}

// ExitedAt is when the sampler first saw pid not running (zero: not yet).
func (w *Watch) ExitedAt(pid int) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.exits[pid]
}

// Superseded checks invariant 2 on reqs: a request the router sent to a
// head whose (group, epoch, term) a newer claim had replaced more than
// slack earlier (the time gossip needs to carry a claim to the router).
func (w *Watch) Superseded(reqs []Req, slack time.Duration) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scan()
	var bad []string
	for _, r := range reqs {
		if r.Group == "" {
			continue
		}
		for _, c := range w.claims {
			newer := c.epoch > r.Epoch || (c.epoch == r.Epoch && c.term > r.Term)
			if c.group == r.Group && newer && c.at.Add(slack).Before(r.Start) {
				bad = append(bad, fmt.Sprintf("%s: sent to %s epoch %d term %d, superseded by epoch %d term %d at %s",
					r.Start.Format("15:04:05.000"), r.Group, r.Epoch, r.Term, c.epoch, c.term, c.at.Format("15:04:05.000")))
				break
			}
		}
	}
	return bad
}
