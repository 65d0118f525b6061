package process

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
	*engine.Exit
}

// Start runs c in a new process group with exactly engine.ProcessEnv(c) as
// its environment. The engine writes its log file itself (O_APPEND), so its
// output goes on when the agent restarts. ctx bounds only the start: the
// process outlives it, and Stop ends it.
func (r *Runtime) Start(_ context.Context, c engine.Command) (engine.Handle, error) {
	if err := os.MkdirAll(r.LogDir, 0o755); err != nil {
		return nil, fmt.Errorf("log dir: %w", err)
	}
	logPath := filepath.Join(r.LogDir, c.LogName()+".log")
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
	h := &Handle{pid: cmd.Process.Pid, ticks: ticks, name: c.Name, logPath: logPath, Exit: engine.NewExit()}
	lf.Close() // the child holds its own descriptor
	go func() {
		err := cmd.Wait()
		h.Finish(exitError(err))
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
	h := &Handle{pid: rec.Pid, ticks: st, name: rec.Name, logPath: log, Exit: engine.NewExit()}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
		h.Finish(&engine.ExitError{Unknown: true})
	}()
	return h, nil
}

// zombie: the process exited and waits to be reaped by a parent that is not
// us; it is gone for our purposes.
func zombie(pid int) bool {
	st, err := State(pid)
	return err != nil || st == 'Z' || st == 'X'
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

// Stop sends SIGTERM to the group, then SIGKILL after grace, and waits for the
// exit up to a further bound. It is safe to call more than once.
func (h *Handle) Stop(ctx context.Context, grace time.Duration) error {
	select {
	case <-h.Done():
		killGroup(h.Pid(), syscall.SIGKILL) // children that outlived the leader
		return nil
	default:
	}
	_ = killGroup(h.Pid(), syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-h.Done():
		killGroup(h.Pid(), syscall.SIGKILL)
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	_ = killGroup(h.Pid(), syscall.SIGKILL)
	select {
	case <-h.Done():
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

// stat returns the fields of /proc/PID/stat that follow the command name
// (which may hold spaces and parentheses): [0] is field 3, the state.
func stat(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	return strings.Fields(string(b[i+1:])), nil
}

// StartTicks reads a process's start time (field 22 of /proc/PID/stat), which
// tells a live process from a recycled pid.
func StartTicks(pid int) (uint64, error) {
	f, err := stat(pid)
	if err != nil {
		return 0, err
	}
	if len(f) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: short", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// State is a process's state letter from /proc (R, S, D, T stopped, Z zombie, …).
func State(pid int) (byte, error) {
	f, err := stat(pid)
	if err != nil {
		return 0, err
	}
	if len(f) == 0 || f[0] == "" {
		return 0, fmt.Errorf("parse /proc/%d/stat: no state", pid)
	}
	return f[0][0], nil
}
