package process

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/engine"
)

// Runtime starts commands as process groups.
type Runtime struct {
	// LogDir receives one NAME.log per command.
	LogDir string
}

var _ engine.Runtime = (*Runtime)(nil)

// New returns a runtime that writes logs under logDir.
func New(logDir string) *Runtime { return &Runtime{LogDir: logDir} }

// Kind is "process".
func (r *Runtime) Kind() string { return "process" }

// Handle is a started or adopted process group.
type Handle struct {
	pid     int
	ticks   uint64
	name    string
	logPath string
	done    chan struct{}
	mu      sync.Mutex
	err     error // guarded by mu; the exit error once done is closed
}

// Start runs c in a new process group with exactly engine.ProcessEnv(c) as
// its environment. The engine writes its log file itself (O_APPEND), so its
// output goes on when the agent restarts. ctx bounds only the start: the
// process outlives it, and Stop ends it.
func (r *Runtime) Start(_ context.Context, c engine.Command) (engine.Handle, error) {
	if err := os.MkdirAll(r.LogDir, 0o755); err != nil {
		return nil, fmt.Errorf("log dir: %w", err)
	}
	logPath := filepath.Join(r.LogDir, c.Name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	fmt.Fprintf(lf, "==> %s shoal: starting %s\n", time.Now().UTC().Format(time.RFC3339), c.String())
	cmd := exec.Command(c.Path, c.Args...)
	cmd.Args[0] = filepath.Base(c.Path) // busybox-style binaries pick their personality from it
	cmd.Env = engine.ProcessEnv(c)
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s (%s): %w", c.Name, c.Path, err)
	}
	ticks, _ := StartTicks(cmd.Process.Pid)
	h := &Handle{pid: cmd.Process.Pid, ticks: ticks, name: c.Name, logPath: logPath, done: make(chan struct{})}
	lf.Close() // the child holds its own descriptor
	go func() {
		err := cmd.Wait()
		h.mu.Lock()
		h.err = exitError(err)
		h.mu.Unlock()
		close(h.done)
	}()
	return h, nil
}

// exitError turns os/exec's wait error into an *engine.ExitError.
func exitError(err error) error {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return err
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return &engine.ExitError{Code: 128 + int(ws.Signal()), Signal: unix.SignalName(ws.Signal())}
	}
	return &engine.ExitError{Code: ee.ExitCode()}
}

// Adopt finds a process group an earlier agent started: the leader must still
// be the same process (pid and start time). Its exit is then watched through
// a pidfd; its exit status cannot be collected, since it is not our child.
func (r *Runtime) Adopt(_ context.Context, rec engine.Record) (engine.Handle, error) {
	if rec.Pid <= 0 {
		return nil, fmt.Errorf("adopt %s: no pid recorded", rec.Name)
	}
	st, err := StartTicks(rec.Pid)
	if err != nil || (rec.StartTicks != 0 && st != rec.StartTicks) {
		return nil, fmt.Errorf("adopt %s (pid %d): %w", rec.Name, rec.Pid, engine.ErrGone)
	}
	if zombie(rec.Pid) {
		return nil, fmt.Errorf("adopt %s (pid %d): %w", rec.Name, rec.Pid, engine.ErrGone)
	}
	fd, err := unix.PidfdOpen(rec.Pid, 0)
	if err != nil {
		return nil, fmt.Errorf("adopt %s (pid %d): pidfd: %w", rec.Name, rec.Pid, err)
	}
	log := rec.Log
	if log == "" {
		log = filepath.Join(r.LogDir, rec.Name+".log")
	}
	h := &Handle{pid: rec.Pid, ticks: st, name: rec.Name, logPath: log, done: make(chan struct{})}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
		h.mu.Lock()
		h.err = &engine.ExitError{Unknown: true}
		h.mu.Unlock()
		close(h.done)
	}()
	return h, nil
}

// zombie: the process exited and waits to be reaped by a parent that is not
// us; it is gone for our purposes.
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

// Exec runs c on the host (the engine's processes are host processes) and
// returns its combined output.
func (r *Runtime) Exec(ctx context.Context, _ engine.Handle, c engine.Command) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.Path, c.Args...)
	cmd.Args[0] = filepath.Base(c.Path)
	cmd.Env = engine.ProcessEnv(c)
	return cmd.CombinedOutput()
}

// Record is what the agent persists to adopt the group after a restart.
func (h *Handle) Record() engine.Record {
	return engine.Record{Name: h.name, Pid: h.pid, StartTicks: h.ticks, Runtime: "process", Log: h.logPath}
}

// Pid is the process (and process group) id.
func (h *Handle) Pid() int { return h.pid }

// Name is the command's name.
func (h *Handle) Name() string { return h.name }

// LogPath is where its output goes.
func (h *Handle) LogPath() string { return h.logPath }

// Done is closed when the process has exited.
func (h *Handle) Done() <-chan struct{} { return h.done }

// Err is the exit error after Done (nil for exit 0).
func (h *Handle) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// Stop sends SIGTERM to the group, then SIGKILL after grace, and waits for the
// exit up to a further bound. It is safe to call more than once.
func (h *Handle) Stop(ctx context.Context, grace time.Duration) error {
	select {
	case <-h.done:
		killGroup(h.Pid(), syscall.SIGKILL) // children that outlived the leader
		return nil
	default:
	}
	_ = killGroup(h.Pid(), syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-h.done:
		killGroup(h.Pid(), syscall.SIGKILL)
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	_ = killGroup(h.Pid(), syscall.SIGKILL)
	select {
	case <-h.done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("stop %s (pid %d): still running 5s after SIGKILL", h.name, h.Pid())
	}
}

func killGroup(pgid int, sig syscall.Signal) error {
	err := syscall.Kill(-pgid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// KillGroup SIGKILLs a process group left from an earlier agent run, if its
// leader is still the process that was started (same start time in /proc).
func KillGroup(pid int, startTicks uint64) {
	if pid <= 0 {
		return
	}
	if st, err := StartTicks(pid); err != nil || st != startTicks {
		return
	}
	_ = killGroup(pid, syscall.SIGKILL)
}

// StartTicks reads a process's start time (field 22 of /proc/PID/stat), which
// tells a live process from a recycled pid.
func StartTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields after it follow the last ')'.
	i := len(b) - 1
	for i >= 0 && b[i] != ')' {
		i--
	}
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	var v uint64
	field := 2
	for _, f := range splitFields(string(b[i+1:])) {
		field++
		if field == 22 {
			_, err := fmt.Sscan(f, &v)
			return v, err
		}
	}
	return 0, fmt.Errorf("parse /proc/%d/stat: short", pid)
}

func splitFields(s string) []string {
	var out []string
	start := -1
	for i, r := range s {
		if r == ' ' || r == '\n' {
			if start >= 0 {
				out = append(out, s[start:i])
				start = -1
			}
		} else if start < 0 {
			start = i
		}
	}
	if start >= 0 {
		out = append(out, s[start:])
	}
	return out
}
