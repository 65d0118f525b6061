package runner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/shoalhq/shoal/engine"
)

// fakeRuntime runs no processes: handles live until stopped or killed by
// the test. Start can take time (an image pull) and honours its context.
type fakeRuntime struct {
	startDelay time.Duration
	startErr   error
	// gpus is what `ray status` reports.
	gpus func() float64

	mu      sync.Mutex
	started []*fakeHandle
	log     []string // starts and stops, in order
}

func (f *fakeRuntime) Kind() string { return "fake" }

func (f *fakeRuntime) Start(ctx context.Context, c engine.Command) (engine.Handle, error) {
	if f.startDelay > 0 {
		t := time.NewTimer(f.startDelay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if f.startErr != nil {
		return nil, f.startErr
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	h := &fakeHandle{rt: f, name: c.Name, pid: 100 + len(f.started), Exit: engine.NewExit()}
	f.started = append(f.started, h)
	f.log = append(f.log, "start "+c.Name)
	return h, nil
}

func (f *fakeRuntime) Adopt(context.Context, engine.Record) (engine.Handle, error) {
	return nil, errors.New("fake runtime adopts nothing")
}

func (f *fakeRuntime) Exec(_ context.Context, _ engine.Handle, c engine.Command) ([]byte, error) {
	g := 16.0
	if f.gpus != nil {
		g = f.gpus()
	}
	return []byte(fmt.Sprintf("======== Autoscaler status ========\nNode status\nActive:\n 2 node_x\nUsage:\n 0.0/%.1f GPU\n", g)), nil
}

func (f *fakeRuntime) events() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.log...)
}

func (f *fakeRuntime) handles() []*fakeHandle {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fakeHandle(nil), f.started...)
}

type fakeHandle struct {
	rt   *fakeRuntime
	name string
	pid  int
	*engine.Exit
	once    sync.Once
	stopped bool
}

func (h *fakeHandle) Name() string    { return h.name }
func (h *fakeHandle) Pid() int        { return h.pid }
func (h *fakeHandle) LogPath() string { return "/logs/" + h.name + ".log" }
func (h *fakeHandle) Record() engine.Record {
	return engine.Record{Name: h.name, Pid: h.pid, Runtime: "fake"}
}

// exit ends the process on its own (a crash).
func (h *fakeHandle) exit(err error) { h.once.Do(func() { h.Finish(err) }) }

func (h *fakeHandle) Stop(context.Context, time.Duration) error {
	h.rt.mu.Lock()
	h.rt.log = append(h.rt.log, "stop "+h.name)
	h.stopped = true
	h.rt.mu.Unlock()
	h.exit(nil)
	return nil
}

// fakeProber answers like an engine the test controls.
type fakeProber struct {
	mu        sync.Mutex
	readyErr  error
	canaryErr error
	scrapeErr error
	metrics   engine.Metrics
	canaries  int
	scrapes   int
}

func (p *fakeProber) Ready(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.readyErr
}

func (p *fakeProber) Canary(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.canaries++
	return p.canaryErr
}

func (p *fakeProber) Scrape(context.Context) (engine.Metrics, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.scrapes++
	return p.metrics, p.scrapeErr
}

func (p *fakeProber) set(f func(p *fakeProber)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p)
}

// fakeMember is a member's agent as the head polls it.
type fakeMember struct {
	mu     sync.Mutex
	report MemberReport
	err    error
	closed bool
}

func (m *fakeMember) Status(context.Context) (MemberReport, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.report, m.err
}

func (m *fakeMember) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

func (m *fakeMember) set(r MemberReport, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.report, m.err = r, err
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// rayPlan is a two-node ray-vllm head plan.
func rayPlan() *engine.Plan {
	return &engine.Plan{Role: engine.RoleHead, Node: engine.Command{Name: "ray", Path: "ray"}, Serve: &engine.Command{Name: "vllm", Path: "vllm"},
		RayAddress: "10.0.0.1:6379", ExpectedGPUs: 16, Endpoint: "10.0.0.1:8000", RayStop: true}
}

// headConfig is a head run on rt and p with member b.
func headConfig(rt *fakeRuntime, p *fakeProber, members map[string]*fakeMember) Config {
	cfg := Config{Group: "g", Epoch: 2, Term: 3, Head: "a", Role: engine.RoleHead, Plan: rayPlan(),
		Runtime:        func(context.Context) (engine.Runtime, error) { return rt, nil },
		Prober:         p,
		StartupTimeout: time.Minute, HangTimeout: time.Minute, CanaryInterval: 30 * time.Second,
		MemberGrace: func(string) time.Duration { return 3 * time.Second },
		Log:         quiet}
	for id := range members {
		cfg.Members = append(cfg.Members, Member{ID: id, Addr: id + ":7947"})
	}
	cfg.Dial = func(addr string) (MemberClient, error) {
		for id, m := range members {
			if id+":7947" == addr {
				return m, nil
			}
		}
		return nil, fmt.Errorf("no member at %s", addr)
	}
	return cfg
}

// okMember reports itself in group g at epoch 2, following term 3.
func okMember() *fakeMember {
	return &fakeMember{report: MemberReport{Group: "g", Epoch: 2, Engine: "running", Term: 3}}
}
