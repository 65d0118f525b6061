package slurm

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fake is an in-memory Slurm for unit tests: jobs stay PENDING until the
// test starts them.
type Fake struct {
	mu   sync.Mutex
	next int
	jobs map[string]*Job
	reqs map[string]Request
	// Down makes every call fail as if slurmctld were gone.
	Down bool
	// Refuse, when set, is Slurm's reason for refusing every job.
	Refuse string
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// NewFake returns an empty Fake whose first job is 100.
func NewFake() *Fake { return &Fake{next: 100, jobs: map[string]*Job{}, reqs: map[string]Request{}} }

func (f *Fake) now() time.Time {
	if f.Now != nil {
		return f.Now()
	}
	return time.Now()
}

func (f *Fake) check() error {
	if f.Down {
		return fmt.Errorf("%w: Unable to contact slurm controller (connect failure)", ErrUnreachable)
	}
	return nil
}

// Submit queues a PENDING job.
func (f *Fake) Submit(_ context.Context, r Request) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return "", err
	}
	if f.Refuse != "" {
		return "", &Refused{Reason: f.Refuse}
	}
	id := strconv.Itoa(f.next)
	f.next++
	f.jobs[id] = &Job{ID: id, Name: r.Name, State: StatePending, Reason: "Priority", Submitted: f.now(), Comment: r.Comment}
	f.reqs[id] = r
	return id, nil
}

// Test refuses with Refuse.
func (f *Fake) Test(_ context.Context, _ Request) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return err
	}
	if f.Refuse != "" {
		return &Refused{Reason: f.Refuse}
	}
	return nil
}

// Jobs lists the active jobs named prefix…, by id.
func (f *Fake) Jobs(_ context.Context, prefix string) ([]Job, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return nil, err
	}
	var out []Job
	for _, j := range f.jobs {
		if j.Active() && strings.HasPrefix(j.Name, prefix) {
			out = append(out, *j)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out, nil
}

// Job reports one job.
func (f *Fake) Job(_ context.Context, id string) (Job, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return Job{}, err
	}
	j, ok := f.jobs[id]
	if !ok {
		return Job{}, ErrNoJob
	}
	return *j, nil
}

// Cancel ends a job.
func (f *Fake) Cancel(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return err
	}
	if j, ok := f.jobs[id]; ok && j.Active() {
		j.State = "CANCELLED"
	}
	return nil
}

// Start runs a pending job on nodes until its time limit.
func (f *Fake) Start(id, nodes string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	j := f.jobs[id]
	j.State, j.Reason, j.Nodes, j.Started = StateRunning, "None", nodes, f.now()
	if t := f.reqs[id].Time; t > 0 {
		j.Ends = j.Started.Add(time.Duration(Minutes(t)) * time.Minute)
	}
}

// Wait sets a pending job's reason.
func (f *Fake) Wait(id, reason string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jobs[id].Reason = reason
}

// End ends a job in state (TIMEOUT, PREEMPTED, FAILED, …).
func (f *Fake) End(id, state string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jobs[id].State = state
}

// Request is what job id was submitted with.
func (f *Fake) Request(id string) Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs[id]
}
