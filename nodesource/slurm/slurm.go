// Package slurm is shoal's edge to a Slurm cluster: submit a job, list the
// jobs shoal submitted, cancel one, and ask Slurm whether it would accept a
// job, through Slurm's own commands (sbatch, squeue, scancel) and their
// machine-readable output. Client is the interface the coordinator's Slurm
// node source and the agent use; CLI is the real one, Fake (fake.go) the
// one unit tests drive.
package slurm

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Job states as squeue prints them (%T).
const (
	StatePending     = "PENDING"
	StateRunning     = "RUNNING"
	StateCompleting  = "COMPLETING"
	StateConfiguring = "CONFIGURING"
	StateSuspended   = "SUSPENDED"
)

// Job is one job as squeue reports it.
type Job struct {
	ID    string
	Name  string
	State string
	// Reason is why a pending job waits (Priority, Resources,
	// PartitionTimeLimit, …) or "None".
	Reason string
	// Nodes is the job's node list as Slurm writes it ("n[1-2]"); empty
	// while pending.
	Nodes string
	// Submitted, Started and Ends are zero where Slurm says N/A or Unknown
	// (a pending job has no end yet).
	Submitted, Started, Ends time.Time
	// Comment is the job's --comment.
	Comment string
}

// Active: the job holds or may soon hold nodes (pending, configuring,
// running, suspended).
func (j Job) Active() bool {
	switch j.State {
	case StatePending, StateRunning, StateConfiguring, StateSuspended:
		return true
	}
	return false
}

// Request is a job to submit: one task per node, the script run by the
// batch step.
type Request struct {
	// Name is the job's name (--job-name).
	Name                    string
	Partition, Account, QoS string
	Nodes                   int
	// GRES per node ("gpu:8", "gpu:h200:8").
	GRES string
	// Time is the time limit (--time, whole minutes, rounded up).
	Time time.Duration
	// Signal asks Slurm to send SIGUSR1 to the job's steps this long
	// before the time limit (--signal=USR1@seconds); 0: none.
	Signal time.Duration
	// Options are more sbatch options, passed as they are ("--exclusive",
	// "--constraint=h200").
	Options []string
	Comment string
	// Script is the batch script, given to sbatch on its standard input.
	Script string
}

// Args are the sbatch options of r (without --parsable or --test-only).
func (r Request) Args() []string {
	a := []string{"--job-name=" + r.Name, "--nodes=" + strconv.Itoa(r.Nodes), "--ntasks-per-node=1"}
	if r.GRES != "" {
		a = append(a, "--gres="+r.GRES)
	}
	if r.Time > 0 {
		a = append(a, "--time="+strconv.Itoa(Minutes(r.Time)))
	}
	if r.Signal > 0 {
		a = append(a, fmt.Sprintf("--signal=USR1@%d", int(r.Signal.Round(time.Second)/time.Second)))
	}
	for _, o := range []struct{ flag, v string }{{"--partition", r.Partition}, {"--account", r.Account}, {"--qos", r.QoS}, {"--comment", r.Comment}} {
		if o.v != "" {
			a = append(a, o.flag+"="+o.v)
		}
	}
	return append(a, r.Options...)
}

// Minutes is d in Slurm's --time minutes, rounded up.
func Minutes(d time.Duration) int {
	return int((d + time.Minute - 1) / time.Minute)
}

// Client is what shoal asks of Slurm.
type Client interface {
	// Submit queues r and returns the job id.
	Submit(ctx context.Context, r Request) (string, error)
	// Test asks Slurm whether it would accept r (sbatch --test-only);
	// the error carries Slurm's own reason.
	Test(ctx context.Context, r Request) error
	// Jobs lists this user's jobs whose name starts with prefix.
	Jobs(ctx context.Context, prefix string) ([]Job, error)
	// Job reports one job (ErrNoJob once Slurm forgot it).
	Job(ctx context.Context, id string) (Job, error)
	// Cancel ends a job; a job that already ended is not an error.
	Cancel(ctx context.Context, id string) error
}

// ErrNoJob: Slurm does not know the job (it ended and was purged).
var ErrNoJob = errors.New("slurm: no such job")

// ErrUnreachable wraps a failure to reach slurmctld.
var ErrUnreachable = errors.New("slurm: cannot reach slurmctld")

// Refused is Slurm refusing a job, in its own words.
type Refused struct{ Reason string }

func (e *Refused) Error() string { return "slurm refused the job: " + e.Reason }

// squeueFormat is what Jobs asks squeue for; fields are separated by a
// character no field holds.
const (
	squeueSep    = "\x1f"
	squeueFormat = "%i\x1f%j\x1f%T\x1f%r\x1f%V\x1f%S\x1f%e\x1f%N\x1f%k"
	squeueFields = 9
)

// ParseSqueue reads squeue's output in squeueFormat, in the time zone loc
// (Slurm prints local times).
func ParseSqueue(out string, loc *time.Location) ([]Job, error) {
	var jobs []Job
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimRight(line, "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Split(line, squeueSep)
		if len(f) != squeueFields {
			return nil, fmt.Errorf("squeue line %d: %d fields, want %d: %q", n+1, len(f), squeueFields, line)
		}
		j := Job{ID: strings.TrimSpace(f[0]), Name: f[1], State: strings.TrimSpace(f[2]), Reason: strings.TrimSpace(f[3]),
			Nodes: strings.TrimSpace(f[7]), Comment: f[8]}
		if j.ID == "" || strings.ContainsAny(j.ID, " \t") {
			return nil, fmt.Errorf("squeue line %d: bad job id %q", n+1, f[0])
		}
		if j.Comment == "(null)" {
			j.Comment = ""
		}
		for i, p := range []*time.Time{&j.Submitted, &j.Started, &j.Ends} {
			t, err := ParseTime(f[4+i], loc)
			if err != nil {
				return nil, fmt.Errorf("squeue line %d: %w", n+1, err)
			}
			*p = t
		}
		jobs = append(jobs, j)
	}
	return jobs, nil
}

// ParseTime reads a Slurm time (2026-12-02T02:18:04); N/A, Unknown, None
// and empty are the zero time.
func ParseTime(s string, loc *time.Location) (time.Time, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "", "N/A", "Unknown", "None", "NONE":
		return time.Time{}, nil
	}
	t, err := time.ParseInLocation("2006-01-02T15:04:05", s, loc)
	if err != nil {
		return time.Time{}, fmt.Errorf("bad Slurm time %q", s)
	}
	return t, nil
}

// ParseJobID reads `sbatch --parsable`'s answer: "id" or "id;cluster".
func ParseJobID(out string) (string, error) {
	s := strings.TrimSpace(out)
	if i := strings.IndexByte(s, ';'); i >= 0 {
		s = s[:i]
	}
	if _, err := strconv.ParseUint(s, 10, 64); err != nil || s == "" {
		return "", fmt.Errorf("sbatch printed %q, not a job id", strings.TrimSpace(out))
	}
	return s, nil
}
