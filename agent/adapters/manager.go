package adapters

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Spec is one adapter of the deployment.
type Spec struct {
	Name, Source string
	Rank         int
	MaxReplicas  int
}

// Engine is the engine's adapter API (vLLM's /v1/load_lora_adapter and
// /v1/unload_lora_adapter).
type Engine interface {
	Load(ctx context.Context, name, path string) error
	Unload(ctx context.Context, name string) error
}

// Fetch readies an adapter's weights on this host and returns the path the
// engine reads them from; progress reports a download's headway.
type Fetch func(ctx context.Context, s Spec, progress func(string)) (string, error)

// Errors of Load.
var (
	ErrUnknown = errors.New("not an adapter of this deployment")
	ErrNoSlot  = errors.New("every adapter slot holds a pinned, busy or requested adapter")
	ErrClosed  = errors.New("the replica's engine run ended")
)

// ErrAlreadyLoaded: the engine holds the adapter already (an agent that
// restarted adopts an engine whose adapters it does not know): a success.
var ErrAlreadyLoaded = errors.New("already loaded")

// State is one adapter as reported.
type State struct {
	Name, State, Reason string
	MaxReplicas         int
	Pinned              bool
	LastUsed            time.Time
	LoadSeconds         float64
}

// Config is what a Manager needs.
type Config struct {
	Slots  int
	Engine Engine
	Fetch  Fetch
	// Changed is called (from any goroutine, never blocking) when a state
	// changes, so that the head republishes its report.
	Changed func()
	Log     *slog.Logger
	Now     func() time.Time
	// OnLoad observes each finished load (metrics): its time and result.
	OnLoad func(name string, d time.Duration, err error)
}

type entry struct {
	Entry
	spec        Spec
	reason      string
	loadSeconds float64
	waiters     []chan error
}

// Manager carries out Decide for one engine run.
type Manager struct {
	cfg    Config
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	kick   chan struct{}

	mu sync.Mutex
	es map[string]*entry // guarded by mu
}

// New starts a manager; Close stops it.
func New(cfg Config) *Manager {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Changed == nil {
		cfg.Changed = func() {}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{cfg: cfg, ctx: ctx, cancel: cancel, done: make(chan struct{}), kick: make(chan struct{}, 1), es: map[string]*entry{}}
	go m.run()
	return m
}

// Close stops the manager (it does not unload anything: the engine run
// is ending) and fails the loads still waiting; Done closes once its
// goroutine has returned.
func (m *Manager) Close() { m.cancel() }

// Done is closed when the manager has stopped.
func (m *Manager) Done() <-chan struct{} { return m.done }

func (m *Manager) poke() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Set gives the deployment's catalog and this replica's share of it.
func (m *Manager) Set(catalog []Spec, pinned, warm, drop []string) {
	m.mu.Lock()
	in := map[string]bool{}
	for _, s := range catalog {
		in[s.Name] = true
		e := m.es[s.Name]
		if e == nil {
			e = &entry{Entry: Entry{Name: s.Name}}
			m.es[s.Name] = e
		}
		if e.spec != (Spec{}) && e.spec != s && e.State != Loaded {
			e.Fails, e.RetryAt, e.reason = 0, time.Time{}, "" // a new source: try afresh
			if e.State == Failed {
				e.State = None
			}
		}
		e.spec, e.InSpec = s, true
		e.Pinned, e.Warm, e.Dropped = slices.Contains(pinned, s.Name), slices.Contains(warm, s.Name), slices.Contains(drop, s.Name)
		if (e.Pinned || e.Warm) && e.State == None {
			e.State = Pending
		}
	}
	var gone []*entry
	for n, e := range m.es {
		if !in[n] {
			e.InSpec, e.Pinned, e.Warm = false, false, false
			if e.State != Loaded && e.State != Loading && e.State != Downloading {
				gone = append(gone, e)
				delete(m.es, n)
			}
		}
	}
	m.mu.Unlock()
	for _, e := range gone {
		for _, w := range e.waiters {
			w <- ErrUnknown
		}
	}
	m.poke()
	m.cfg.Changed()
}

// Used marks the adapters that have requests running or waiting now (the
// engine's vllm:lora_requests_info); the others are not busy.
func (m *Manager) Used(active []string) {
	now := m.cfg.Now()
	m.mu.Lock()
	for n, e := range m.es {
		busy := slices.Contains(active, n)
		e.Busy = busy
		if busy {
			e.LastUsed = now
		}
	}
	m.mu.Unlock()
}

// Load has the adapter loaded here and returns once the engine serves it.
func (m *Manager) Load(ctx context.Context, name string) error {
	m.mu.Lock()
	e := m.es[name]
	switch {
	case e == nil || !e.InSpec:
		m.mu.Unlock()
		return fmt.Errorf("%q: %w", name, ErrUnknown)
	case e.State == Loaded:
		e.LastUsed = m.cfg.Now()
		m.mu.Unlock()
		return nil
	}
	w := make(chan error, 1)
	e.waiters = append(e.waiters, w)
	if e.Asked.IsZero() {
		e.Asked = m.cfg.Now()
	}
	if e.State == None || e.State == Failed {
		e.State = Pending
	}
	m.mu.Unlock()
	m.poke()
	m.cfg.Changed()
	select {
	case err := <-w:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-m.ctx.Done():
		return ErrClosed
	}
}

// States lists every adapter of the catalog with its state, by name.
func (m *Manager) States() []State {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]State, 0, len(m.es))
	for _, e := range m.es {
		if !e.InSpec {
			continue
		}
		out = append(out, State{Name: e.Name, State: e.State, Reason: e.reason, MaxReplicas: e.spec.MaxReplicas, Pinned: e.Pinned,
			LastUsed: e.LastUsed, LoadSeconds: e.loadSeconds})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (m *Manager) view() []Entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Entry, 0, len(m.es))
	for _, e := range m.es {
		out = append(out, e.Entry)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (m *Manager) run() {
	defer close(m.done)
	defer m.failWaiters(ErrClosed)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for m.ctx.Err() == nil {
		act := Decide(m.view(), m.cfg.Slots, m.cfg.Now())
		for _, n := range act.Refuse {
			m.finish(n, ErrNoSlot, false)
		}
		switch act.Kind {
		case "load":
			m.load(act.Name)
			continue
		case "unload":
			m.unload(act.Name, "not wanted here any more")
			continue
		case "evict":
			m.unload(act.Victim, "evicted (least recently used) to load "+act.Name)
			continue
		}
		m.settle()
		timer.Stop()
		if !act.Wake.IsZero() {
			timer.Reset(max(time.Until(act.Wake), time.Millisecond))
		}
		select {
		case <-m.ctx.Done():
		case <-m.kick:
		case <-timer.C:
		}
	}
}

// settle: with nothing left to do, a warm adapter still pending found no
// free slot; it is not coming (the report then shows the replica settled).
func (m *Manager) settle() {
	changed := false
	m.mu.Lock()
	for _, e := range m.es {
		if e.State == Pending && e.Warm && !e.Pinned && e.Asked.IsZero() {
			e.State, changed = None, true
		}
	}
	m.mu.Unlock()
	if changed {
		m.cfg.Changed()
	}
}

func (m *Manager) set(name string, f func(e *entry)) {
	m.mu.Lock()
	if e := m.es[name]; e != nil {
		f(e)
	}
	m.mu.Unlock()
	m.cfg.Changed()
}

// load fetches and loads one adapter (the manager's goroutine).
func (m *Manager) load(name string) {
	m.mu.Lock()
	e := m.es[name]
	if e == nil {
		m.mu.Unlock()
		return
	}
	s := e.spec
	e.State, e.reason = Downloading, ""
	m.mu.Unlock()
	m.cfg.Changed()
	start := time.Now()
	path, err := m.cfg.Fetch(m.ctx, s, func(p string) { m.set(name, func(e *entry) { e.reason = p }) })
	if err == nil {
		m.set(name, func(e *entry) { e.State, e.reason = Loading, "" })
		err = m.cfg.Engine.Load(m.ctx, name, path)
		if errors.Is(err, ErrAlreadyLoaded) {
			err = nil
		}
	}
	if m.ctx.Err() != nil {
		return
	}
	d := time.Since(start)
	if m.cfg.OnLoad != nil {
		m.cfg.OnLoad(name, d, err)
	}
	if err != nil {
		m.cfg.Log.Warn("adapter load failed", "adapter", name, "source", s.Source, "err", err)
	} else {
		m.cfg.Log.Info("adapter loaded", "adapter", name, "took", d.Round(time.Millisecond))
	}
	m.mu.Lock()
	if e := m.es[name]; e != nil {
		e.loadSeconds = d.Seconds()
	}
	m.mu.Unlock()
	m.finish(name, err, true)
}

// finish records a load's end and answers the requests waiting on it.
func (m *Manager) finish(name string, err error, tried bool) {
	m.mu.Lock()
	e := m.es[name]
	if e == nil {
		m.mu.Unlock()
		return
	}
	ws := e.waiters
	e.waiters, e.Asked = nil, time.Time{}
	if !e.InSpec && err != nil {
		delete(m.es, name) // removed while it was loading, and never loaded
	}
	switch {
	case err == nil:
		e.State, e.reason, e.Fails, e.RetryAt, e.LastUsed = Loaded, "", 0, time.Time{}, m.cfg.Now()
	case tried:
		e.Fails++
		e.State, e.reason = Failed, err.Error()
		if e.Fails < MaxAttempts {
			e.reason = fmt.Sprintf("%v (attempt %d of %d; next in %s)", err, e.Fails, MaxAttempts, Backoff(e.Fails))
			e.RetryAt = m.cfg.Now().Add(Backoff(e.Fails))
		}
	default:
		if e.State == Pending && !e.Pinned {
			e.State = None
		}
	}
	m.mu.Unlock()
	for _, w := range ws {
		w <- err
	}
	m.cfg.Changed()
}

// unload takes an adapter off the engine.
func (m *Manager) unload(name, why string) {
	err := m.cfg.Engine.Unload(m.ctx, name)
	if m.ctx.Err() != nil {
		return
	}
	if err != nil {
		m.cfg.Log.Warn("adapter unload failed", "adapter", name, "err", err)
	} else {
		m.cfg.Log.Info("adapter unloaded", "adapter", name, "why", why)
	}
	m.mu.Lock()
	if e := m.es[name]; e != nil {
		switch {
		case err != nil:
			// The engine may still hold it: counted as loaded until a later
			// unload succeeds (a slot is never counted free too early).
			e.reason, e.RetryAt = "unload failed: "+err.Error(), m.cfg.Now().Add(RetryBase)
		case !e.InSpec:
			delete(m.es, name)
		default:
			e.State, e.reason, e.RetryAt = None, "", time.Time{}
		}
	}
	m.mu.Unlock()
	m.cfg.Changed()
}

func (m *Manager) failWaiters(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.es {
		for _, w := range e.waiters {
			w <- err
		}
		e.waiters = nil
	}
}

// StatusError is a Load error as the Replica API answers it.
func StatusError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrUnknown):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ErrNoSlot):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, ErrClosed), errors.Is(err, context.Canceled):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.FailedPrecondition, err.Error())
}
