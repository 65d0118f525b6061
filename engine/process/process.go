package process

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/engine"
)

// Runtime starts commands as process groups.
type Runtime struct {
	// LogDir receives one NAME.log per command.
	LogDir string
}

// New returns a runtime that writes logs under logDir.
func New(logDir string) *Runtime { return &Runtime{LogDir: logDir} }

// Handle is a started process group.
type Handle struct {
	cmd     *exec.Cmd
	name    string
	logPath string
	done    chan struct{}
	mu      sync.Mutex
	err     error // guarded by mu; the exit error once done is closed
}

// Start runs c in a new process group. ctx bounds only the start itself: the
// process outlives it, and Stop ends it.
func (r *Runtime) Start(_ context.Context, c engine.Command) (*Handle, error) {
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
	cmd.Args[0] = c.Name
	cmd.Env = append(os.Environ(), c.Env...)
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s (%s): %w", c.Name, c.Path, err)
	}
	h := &Handle{cmd: cmd, name: c.Name, logPath: logPath, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		lf.Close()
		h.mu.Lock()
		h.err = err
		h.mu.Unlock()
		close(h.done)
	}()
	return h, nil
}

// Pid is the process (and process group) id.
func (h *Handle) Pid() int { return h.cmd.Process.Pid }

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
