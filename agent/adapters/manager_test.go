package adapters

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeEngine holds what was loaded; fail makes a load of a name fail.
type fakeEngine struct {
	mu     sync.Mutex
	held   map[string]string
	fail   map[string]error
	loads  []string
	events chan string
}

func newFake() *fakeEngine {
	return &fakeEngine{held: map[string]string{}, fail: map[string]error{}, events: make(chan string, 100)}
}

func (f *fakeEngine) Load(_ context.Context, name, path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.loads = append(f.loads, name)
	if err := f.fail[name]; err != nil {
		f.events <- "fail " + name
		return err
	}
	if _, ok := f.held[name]; ok {
		return ErrAlreadyLoaded
	}
	f.held[name] = path
	f.events <- "load " + name
	return nil
}

func (f *fakeEngine) Unload(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.held, name)
	f.events <- "unload " + name
	return nil
}

func (f *fakeEngine) holds() map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]string{}
	for k, v := range f.held {
		out[k] = v
	}
	return out
}

func fetchTo(dir string) Fetch {
	return func(_ context.Context, s Spec, progress func(string)) (string, error) {
		progress("50% 1 MiB/s")
		return dir + "/" + s.Name, nil
	}
}

func next(t *testing.T, f *fakeEngine) string {
	t.Helper()
	select {
	case e := <-f.events:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no engine call")
		return ""
	}
}

func catalog(names ...string) []Spec {
	var out []Spec
	for _, n := range names {
		out = append(out, Spec{Name: n, Source: "s3://loras/" + n, Rank: 8})
	}
	return out
}

func stateOf(m *Manager, name string) State {
	for _, s := range m.States() {
		if s.Name == name {
			return s
		}
	}
	return State{}
}

func TestManagerPinsAsksAndEvicts(t *testing.T) {
	f := newFake()
	m := New(Config{Slots: 2, Engine: f, Fetch: fetchTo("/models/adapters")})
	defer func() { m.Close(); <-m.Done() }()

	m.Set(catalog("a", "b", "c"), []string{"a"}, nil, nil)
	require.Equal(t, "load a", next(t, f))
	require.Eventually(t, func() bool { return stateOf(m, "a").State == Loaded }, 5*time.Second, time.Millisecond)
	require.Equal(t, State{}, stateOf(m, "zzz"))
	require.Equal(t, None, stateOf(m, "b").State, "not pinned: not loaded")

	require.NoError(t, m.Load(context.Background(), "b"))
	require.Equal(t, "load b", next(t, f))
	require.Equal(t, map[string]string{"a": "/models/adapters/a", "b": "/models/adapters/b"}, f.holds())

	// Full: c evicts b (a is pinned), the least recently used.
	require.NoError(t, m.Load(context.Background(), "c"))
	require.Equal(t, "unload b", next(t, f))
	require.Equal(t, "load c", next(t, f))
	require.Equal(t, None, stateOf(m, "b").State)

	// c busy and a pinned: b has no slot.
	m.Used([]string{"c"})
	err := m.Load(context.Background(), "b")
	require.ErrorIs(t, err, ErrNoSlot)

	require.ErrorIs(t, m.Load(context.Background(), "nope"), ErrUnknown)

	// c leaves the catalog: unloaded.
	m.Set(catalog("a", "b"), []string{"a"}, nil, nil)
	require.Equal(t, "unload c", next(t, f))
	require.Eventually(t, func() bool { return len(m.States()) == 2 }, 5*time.Second, time.Millisecond)
}

func TestManagerRetriesAndFails(t *testing.T) {
	f := newFake()
	f.fail["a"] = errors.New("engine refused the load (400): LoRA rank 32 is greater than max_lora_rank 16.")
	m := New(Config{Slots: 2, Engine: f, Fetch: fetchTo("/a")})
	defer func() { m.Close(); <-m.Done() }()
	m.Set(catalog("a"), []string{"a"}, nil, nil)
	require.Equal(t, "fail a", next(t, f))
	require.Eventually(t, func() bool {
		s := stateOf(m, "a")
		return s.State == Failed && s.Reason != ""
	}, 5*time.Second, time.Millisecond)
	require.Contains(t, stateOf(m, "a").Reason, "max_lora_rank 16. (attempt 1 of 5; next in 5s)")
	// A router asking retries at once, and hears the failure.
	err := m.Load(context.Background(), "a")
	require.ErrorContains(t, err, "max_lora_rank")
	require.Equal(t, "fail a", next(t, f))
}

func TestManagerAdoptsAndCloses(t *testing.T) {
	f := newFake()
	f.held["a"] = "/a/a" // the engine outlived an agent restart
	block := make(chan struct{})
	slow := func(ctx context.Context, s Spec, progress func(string)) (string, error) {
		if s.Name == "b" {
			progress("50% 1 MiB/s")
			select {
			case <-block:
			case <-ctx.Done():
				return "", ctx.Err()
			}
		}
		return "/a/" + s.Name, nil
	}
	m := New(Config{Slots: 4, Engine: f, Fetch: slow})
	m.Set(catalog("a", "b"), []string{"a"}, nil, nil)
	require.Eventually(t, func() bool { return stateOf(m, "a").State == Loaded }, 5*time.Second, time.Millisecond, "already loaded counts as loaded")
	errc := make(chan error, 1)
	go func() { errc <- m.Load(context.Background(), "b") }()
	require.Eventually(t, func() bool { return stateOf(m, "b").State == Downloading }, 5*time.Second, time.Millisecond)
	require.Equal(t, "50% 1 MiB/s", stateOf(m, "b").Reason, "a download's progress")
	m.Close()
	<-m.Done()
	require.ErrorIs(t, <-errc, ErrClosed)
	close(block)
}

// Warm adapters load into free slots and, when none is free, settle back
// to not held (the report then shows the replica done).
func TestManagerWarmSettles(t *testing.T) {
	f := newFake()
	m := New(Config{Slots: 2, Engine: f, Fetch: fetchTo("/a")})
	defer func() { m.Close(); <-m.Done() }()
	m.Set(catalog("a", "b", "c"), []string{"a"}, []string{"b", "c"}, nil)
	got := map[string]bool{}
	for i := 0; i < 2; i++ {
		got[next(t, f)] = true
	}
	require.True(t, got["load a"], "the pin first")
	require.Eventually(t, func() bool {
		var states []string
		for _, s := range m.States() {
			states = append(states, s.State)
		}
		loaded, none := 0, 0
		for _, s := range states {
			switch s {
			case Loaded:
				loaded++
			case None:
				none++
			}
		}
		return loaded == 2 && none == 1
	}, 5*time.Second, time.Millisecond, "one warm adapter loaded into the free slot, the other settled")
}
