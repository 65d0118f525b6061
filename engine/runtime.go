package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

// Runtime runs the commands of a plan: engine/process as process groups,
// engine/containerd as containers. engine/enginetest holds the suite every
// runtime passes.
type Runtime interface {
	// Kind is the spec's engine.runtime value ("process", "containerd").
	Kind() string
	// Start runs c. ctx bounds only the start: the engine outlives it (and the
	// agent process), and Handle.Stop ends it.
	Start(ctx context.Context, c Command) (Handle, error)
	// Adopt finds an engine that an earlier agent process started, from the
	// record it persisted. It returns ErrGone when that engine no longer runs.
	Adopt(ctx context.Context, rec Record) (Handle, error)
	// Exec runs a short command beside h (inside its container for
	// containerd) and returns its combined output.
	Exec(ctx context.Context, h Handle, c Command) ([]byte, error)
}

// Handle is one started (or adopted) engine command.
type Handle interface {
	Name() string
	// Pid is the host pid of the command's main process.
	Pid() int
	// LogPath is the file receiving its stdout and stderr.
	LogPath() string
	// Done is closed when it has exited.
	Done() <-chan struct{}
	// Err is, after Done, nil for exit status 0, else an *ExitError.
	Err() error
	// Stop: SIGTERM to every process of the engine, grace, SIGKILL, bounded
	// wait. Safe to call more than once and after the engine exited.
	Stop(ctx context.Context, grace time.Duration) error
	// Record is what the agent persists to adopt the engine after a restart.
	Record() Record
}

// Record identifies a running engine across agent restarts. The JSON names of
// the first fields match what agents before the runtime interface wrote.
type Record struct {
	Name       string `json:"name"`
	Pid        int    `json:"pid"`
	StartTicks uint64 `json:"start_ticks,omitempty"`
	Runtime    string `json:"runtime,omitempty"`
	// Container is the containerd container id (its namespace is the runtime's).
	Container string `json:"container,omitempty"`
	Log       string `json:"log,omitempty"`
}

// ErrGone: the engine a record names no longer runs.
var ErrGone = errors.New("engine no longer runs")

// ExitError is an engine's non-zero end.
type ExitError struct {
	Code int // exit status, or 128+signal as a shell reports it
	// Signal names the signal that ended it, if one did.
	Signal string
	// Unknown: the engine was adopted, so its status could not be collected
	// (a process that is not the agent's child).
	Unknown bool
}

func (e *ExitError) Error() string {
	switch {
	case e.Unknown:
		return "exited (status unknown: the engine was adopted after an agent restart)"
	case e.Signal != "":
		return "killed by " + e.Signal
	default:
		return fmt.Sprintf("exit status %d", e.Code)
	}
}

// ExitCode is the exit status an engine's Err carries: 0 for nil, -1 when
// unknown.
func ExitCode(err error) int {
	if err == nil {
		return 0
	}
	var e *ExitError
	if errors.As(err, &e) && !e.Unknown {
		return e.Code
	}
	return -1
}

// Mount is a host path the containerd runtime binds into the container.
type Mount struct {
	Source, Target string
	ReadOnly       bool
}

// Container is what the containerd runtime needs beyond argv and env; the
// process runtime ignores it.
type Container struct {
	Image  string
	Mounts []Mount
	// ShmBytes sizes /dev/shm (0: half of the host's memory).
	ShmBytes int64
	// Labels are added to the container (the runtime adds its own).
	Labels map[string]string
}

// inheritedEnv are the only variables of the agent's own environment an
// engine gets besides its plan: what any program needs to find its tools and
// speak the host's locale. Everything else (cloud credentials, HF_TOKEN, the
// agent's SHOAL_* settings) stays out unless the plan names it.
var inheritedEnv = []string{"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR"}

// ProcessEnv is the exact environment of a process-runtime engine: the
// inherited basics from the agent's environment, then c.Env (which wins).
func ProcessEnv(c Command) []string {
	m := map[string]string{}
	for _, k := range inheritedEnv {
		if v, ok := os.LookupEnv(k); ok {
			m[k] = v
		}
	}
	if _, ok := m["PATH"]; !ok {
		m["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	for _, kv := range c.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	out := make([]string, 0, len(m))
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// Exit is the end of an engine, shared by the runtimes' handles: Done is
// closed once Finish has recorded the error Err then returns.
type Exit struct {
	done chan struct{}
	mu   sync.Mutex
	err  error // guarded by mu
}

// NewExit returns an Exit that is not done.
func NewExit() *Exit { return &Exit{done: make(chan struct{})} }

// Done is closed when the engine has exited.
func (e *Exit) Done() <-chan struct{} { return e.done }

// Err is, after Done, nil for exit status 0, else an *ExitError (or the error
// that ended the watch).
func (e *Exit) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// Finish records err and closes Done; it must be called once.
func (e *Exit) Finish(err error) {
	e.mu.Lock()
	e.err = err
	e.mu.Unlock()
	close(e.done)
}
