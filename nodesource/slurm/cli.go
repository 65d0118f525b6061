package slurm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// CLI is Client through Slurm's commands. Empty fields mean the commands
// on PATH and Slurm's own configuration (SLURM_CONF).
type CLI struct {
	Sbatch, Squeue, Scancel string
	// Env is added to the commands' environment (SLURM_CONF=…).
	Env []string
	// Location is the time zone Slurm prints times in (default: local).
	Location *time.Location
}

func (c *CLI) bin(b, def string) string {
	if b != "" {
		return b
	}
	return def
}

func (c *CLI) run(ctx context.Context, stdin string, name string, args ...string) (string, string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), c.Env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if err != nil {
		msg := strings.TrimSpace(errb.String())
		if msg == "" {
			msg = strings.TrimSpace(out.String())
		}
		if ctx.Err() != nil {
			return out.String(), msg, fmt.Errorf("%w: %s timed out (%v)", ErrUnreachable, name, ctx.Err())
		}
		if unreachable(msg) {
			return out.String(), msg, fmt.Errorf("%w: %s", ErrUnreachable, oneLine(msg))
		}
		if _, ok := err.(*exec.ExitError); !ok {
			return out.String(), msg, fmt.Errorf("slurm: %s: %w (is Slurm's client installed?)", name, err)
		}
		return out.String(), msg, fmt.Errorf("%s: %s", name, oneLine(msg))
	}
	return out.String(), errb.String(), nil
}

// unreachable: the message says slurmctld did not answer.
func unreachable(msg string) bool {
	for _, s := range []string{"Unable to contact slurm controller", "Socket timed out", "Connection refused", "Communication connection failure"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

func oneLine(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "; ")
}

func (c *CLI) loc() *time.Location {
	if c.Location != nil {
		return c.Location
	}
	return time.Local
}

// Submit runs sbatch --parsable with r's options and script.
func (c *CLI) Submit(ctx context.Context, r Request) (string, error) {
	out, msg, err := c.run(ctx, r.Script, c.bin(c.Sbatch, "sbatch"), append([]string{"--parsable"}, r.Args()...)...)
	if err != nil {
		return "", refusedOr(err, msg)
	}
	return ParseJobID(out)
}

// Test runs sbatch --test-only: Slurm checks partition, account, QoS, GRES
// and time limit as it would for the real job.
func (c *CLI) Test(ctx context.Context, r Request) error {
	_, msg, err := c.run(ctx, r.Script, c.bin(c.Sbatch, "sbatch"), append([]string{"--test-only"}, r.Args()...)...)
	if err != nil {
		return refusedOr(err, msg)
	}
	return nil
}

// refusedOr turns sbatch's own refusal into *Refused; unreachable stays so.
func refusedOr(err error, msg string) error {
	if msg == "" || errors.Is(err, ErrUnreachable) || strings.HasPrefix(err.Error(), "slurm: ") {
		return err
	}
	return &Refused{Reason: oneLine(msg)}
}

// Jobs lists this user's jobs named prefix….
func (c *CLI) Jobs(ctx context.Context, prefix string) ([]Job, error) {
	out, _, err := c.run(ctx, "", c.bin(c.Squeue, "squeue"), "--me", "--noheader", "--format="+squeueFormat)
	if err != nil {
		return nil, err
	}
	all, err := ParseSqueue(out, c.loc())
	if err != nil {
		return nil, err
	}
	var jobs []Job
	for _, j := range all {
		if strings.HasPrefix(j.Name, prefix) {
			jobs = append(jobs, j)
		}
	}
	return jobs, nil
}

// Job reports one job.
func (c *CLI) Job(ctx context.Context, id string) (Job, error) {
	out, msg, err := c.run(ctx, "", c.bin(c.Squeue, "squeue"), "--noheader", "--jobs="+id, "--format="+squeueFormat)
	if err != nil {
		if strings.Contains(msg, "Invalid job id") {
			return Job{}, ErrNoJob
		}
		return Job{}, err
	}
	jobs, err := ParseSqueue(out, c.loc())
	if err != nil {
		return Job{}, err
	}
	for _, j := range jobs {
		if j.ID == id {
			return j, nil
		}
	}
	return Job{}, ErrNoJob
}

// Cancel runs scancel.
func (c *CLI) Cancel(ctx context.Context, id string) error {
	_, msg, err := c.run(ctx, "", c.bin(c.Scancel, "scancel"), id)
	if err != nil && (strings.Contains(msg, "already completing or completed") || strings.Contains(msg, "Invalid job id")) {
		return nil
	}
	return err
}
