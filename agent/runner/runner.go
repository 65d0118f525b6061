package runner

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/agent/kvrelay"
	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/internal/kvevents"
)

// Config is one run: what to start, and how to supervise it.
type Config struct {
	Group string
	Epoch uint64
	Term  uint64
	// Head is the node the run follows (itself, for a head).
	Head string
	Role engine.Role
	Plan *engine.Plan
	// Runtime resolves the engine runtime. Connecting to containerd can take
	// seconds, so the runner calls it on its own goroutine.
	Runtime func(ctx context.Context) (engine.Runtime, error)
	// Weights readies the model on this host before any process starts (a
	// pull, or a check of a local path); nil when there is nothing to do.
	// Its error is the run's failure, worded for the operator.
	Weights func(ctx context.Context, progress func(string)) error
	// Downloads: Weights pulls, and the run advertises downloading meanwhile.
	Downloads bool
	// Prober reaches the engine's OpenAI server (head only).
	Prober Prober
	// StartupTimeout bounds the start from the first process to ready.
	StartupTimeout time.Duration
	// HangTimeout fails a head whose engine has requests but generates no
	// token for this long (0: never).
	HangTimeout time.Duration
	// CanaryInterval sends the canary to an idle head this often (0: never).
	CanaryInterval time.Duration
	// HeadUp reports whether the head's node process runs (a worker joins
	// the head then; nil: at once).
	HeadUp func() bool
	// Members are the nodes this run polls through Dial (a head: the other
	// members; a worker: its head); MemberGrace is how long one may leave a
	// poll unanswered.
	Members     []Member
	Dial        func(addr string) (MemberClient, error)
	MemberGrace func(id string) time.Duration
	// RayStop cleans up what Ray left after the processes stopped (`ray stop
	// --force`); nil when there is nothing to clean.
	RayStop func(ctx context.Context)
	// KVSubscribe hears the engine's KV events until ctx ends (head with
	// Plan.KVEvents; nil: the run relays none).
	KVSubscribe func(ctx context.Context, h kvevents.Handler) error
	// Notify wakes the supervisor after a change of Status. It must not block.
	Notify func()
	Log    *slog.Logger
}

// Status is a run as its supervisor sees it.
type Status struct {
	// Phase is the gossip engine state: starting, downloading, running,
	// loading or ready.
	Phase string
	// Failed says why the run failed; "" while it is healthy.
	Failed string
	// Progress is a weight pull's "43% 1.2 GiB/s" while downloading.
	Progress string
	Metrics  Metrics
	// Records are the started (or adopted) engines, in start order: what the
	// agent persists so that its next process adopts them.
	Records []engine.Record
	// Stopping: Stop was called; Stopped: the run is over (Done is closed).
	Stopping bool
	Stopped  bool
}

// Runner is one engine run.
type Runner struct {
	cfg Config
	log *slog.Logger
	// ctx bounds the run's supervision and its starts; Stop and Detach end it.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the run but the finisher
	done   chan struct{}

	mu       sync.Mutex
	rt       engine.Runtime  // guarded by mu
	procs    []engine.Handle // guarded by mu; in start order
	phase    string          // guarded by mu
	failed   string          // guarded by mu
	progress string          // guarded by mu
	ms       metricsState    // guarded by mu
	stopping bool            // guarded by mu
	detached bool            // guarded by mu
	finished bool            // guarded by mu
	// kv relays the engine's KV events (head with events on; nil otherwise).
	kv *kvrelay.Relay
}

// New prepares a run. It starts nothing.
func New(cfg Config) *Runner {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Notify == nil {
		cfg.Notify = func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Runner{cfg: cfg, log: cfg.Log, ctx: ctx, cancel: cancel, done: make(chan struct{}), phase: gossip.EngineStarting}
	r.kv = r.newRelay()
	return r
}

// Start begins the run's sequence for its role.
func (r *Runner) Start() {
	if r.cfg.Role == engine.RoleHead {
		if r.kv != nil {
			r.goRun(r.kvLoop)
		}
		r.goRun(r.headSequence)
	} else {
		r.goRun(r.workerSequence)
	}
	r.watchMembers()
}

// Adopt resumes a run whose engines an earlier agent process started: rt
// and handles are what the runtime re-attached. A head goes through the
// readiness probe again (an engine that serves passes it at once) and the
// same supervision; a worker only watches its processes.
func Adopt(cfg Config, rt engine.Runtime, handles []engine.Handle) *Runner {
	r := New(cfg)
	r.rt, r.procs = rt, handles
	r.phase = gossip.EngineRunning
	if cfg.Role == engine.RoleHead {
		r.phase = gossip.EngineLoading
	}
	for _, h := range handles {
		r.watchExit(h)
	}
	if cfg.Role == engine.RoleHead {
		if r.kv != nil {
			r.goRun(r.kvLoop)
		}
		r.goRun(func() { r.serveLoop(time.Now().Add(r.cfg.StartupTimeout)) })
	}
	r.watchMembers()
	return r
}

// Stop ends the run and its engines, newest process first (vllm before
// ray): SIGTERM, grace, SIGKILL, then RayStop. It returns at once; Done is
// closed once everything has stopped. Later calls (and a Stop after
// Detach) do nothing.
func (r *Runner) Stop(why string, grace time.Duration) {
	r.mu.Lock()
	if r.stopping || r.detached {
		r.mu.Unlock()
		return
	}
	r.stopping = true
	r.mu.Unlock()
	r.log.Info("stopping engine", "reason", why, "grace", grace)
	r.cancel()
	go r.finishStop(grace)
	r.cfg.Notify()
}

// Detach ends the supervision and leaves the engines running, for the next
// agent process to adopt. It returns at once; Done is closed once the run's
// goroutines have ended.
func (r *Runner) Detach() {
	r.mu.Lock()
	if r.stopping || r.detached {
		r.mu.Unlock()
		return
	}
	r.detached = true
	r.mu.Unlock()
	r.cancel()
	go func() {
		r.wg.Wait()
		r.end()
	}()
}

// Done is closed when the run is over: stopped, or detached.
func (r *Runner) Done() <-chan struct{} { return r.done }

// Status is a copy of the run's state.
func (r *Runner) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Status{Phase: r.phase, Failed: r.failed, Progress: r.progress, Metrics: r.ms.view(),
		Stopping: r.stopping, Stopped: r.finished}
	if st.Metrics.Have && r.cfg.Plan != nil {
		st.Metrics.Ranks = rankView(r.cfg.Plan.APIServers, r.ms.last)
	}
	for _, h := range r.procs {
		st.Records = append(st.Records, h.Record())
	}
	return st
}

// Pids are the engines' host pids, for logs.
func (r *Runner) Pids() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []int
	for _, h := range r.procs {
		out = append(out, h.Pid())
	}
	return out
}

// Handles are the run's engines, for log rotation.
func (r *Runner) Handles() []engine.Handle {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]engine.Handle(nil), r.procs...)
}

func (r *Runner) finishStop(grace time.Duration) {
	r.wg.Wait() // nothing starts any more: every start runs on a goroutine of wg
	r.mu.Lock()
	procs := r.procs
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), grace+10*time.Second)
	defer cancel()
	for i := len(procs) - 1; i >= 0; i-- {
		if err := procs[i].Stop(ctx, grace); err != nil {
			r.log.Warn("engine process did not stop", "name", procs[i].Name(), "err", err)
		}
	}
	if len(procs) > 0 && r.cfg.RayStop != nil {
		r.cfg.RayStop(ctx)
	}
	r.log.Info("engine stopped")
	r.end()
}

func (r *Runner) end() {
	if r.kv != nil {
		r.kv.Close() // routers' streams of this run end
	}
	r.mu.Lock()
	r.finished = true
	r.mu.Unlock()
	close(r.done)
	r.cfg.Notify()
}

// goRun runs f on a goroutine the run owns.
func (r *Runner) goRun(f func()) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f()
	}()
}

func (r *Runner) setPhase(p string) {
	r.mu.Lock()
	r.phase = p
	r.mu.Unlock()
	r.cfg.Notify()
}

// fail records the first reason the run failed; the supervisor stops it.
func (r *Runner) fail(why string) {
	r.mu.Lock()
	first := r.failed == "" && !r.stopping && !r.detached
	if first {
		r.failed = why
	}
	r.mu.Unlock()
	if first {
		r.log.Warn("engine run failed", "reason", why)
		r.cfg.Notify()
	}
}

func (r *Runner) setProgress(p string) {
	r.mu.Lock()
	r.progress = p
	r.mu.Unlock()
}

func (r *Runner) runtime() engine.Runtime {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rt
}

// startProc starts c on the run's runtime and watches its exit. The handle
// is kept even when the run was stopped meanwhile: the stop (which waits for
// this goroutine) then ends it, and a detach leaves it recorded.
func (r *Runner) startProc(c engine.Command) (engine.Handle, error) {
	if err := r.ctx.Err(); err != nil {
		return nil, err
	}
	rt := r.runtime()
	h, err := rt.Start(r.ctx, c)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.procs = append(r.procs, h)
	r.mu.Unlock()
	r.log.Info("engine process started", "name", c.Name, "runtime", rt.Kind(), "pid", h.Pid(), "argv", strings.Join(c.Argv(), " "), "log", h.LogPath())
	r.watchExit(h)
	r.cfg.Notify() // a new record to persist
	return h, nil
}

// watchExit fails the run when h exits while the run is meant to go on.
func (r *Runner) watchExit(h engine.Handle) {
	r.goRun(func() {
		select {
		case <-h.Done():
			if r.ctx.Err() == nil {
				r.fail(fmt.Sprintf("%s exited (%v); see %s", h.Name(), h.Err(), h.LogPath()))
			}
		case <-r.ctx.Done():
		}
	})
}

// node is the handle of the plan's node command (ray start, the program).
func (r *Runner) node() engine.Handle {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.procs) == 0 {
		return nil
	}
	return r.procs[0]
}

// sleep waits d, or returns false once the run ends.
func (r *Runner) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-r.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
