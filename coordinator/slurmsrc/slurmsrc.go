// Package slurmsrc is the coordinator's Slurm node source decision: from
// the Slurm-sourced deployments and their replica counts, the jobs Slurm
// lists, the stored groups, the gossip and the time, Decide says which jobs
// to submit and cancel, which nodes belong to which job, which replicas must
// be handed over before their job ends, and which replicas lost their job —
// without doing any of it. Every rule is table-tested with an injected
// clock; the coordinator's executor runs sbatch and scancel
// (docs/design/slurm.md).
package slurmsrc

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/nodesource/slurm"
	"github.com/shoalhq/shoal/spec"
)

// Deployment is a Slurm-sourced deployment and its replica count.
type Deployment struct {
	Name    string
	Spec    *spec.Deployment
	Desired int
}

// Snapshot is what Decide reads.
type Snapshot struct {
	Now time.Time
	// Prefix starts the name of every job this cluster submits; a job is
	// named Prefix + deployment.
	Prefix      string
	Deployments []Deployment
	// Jobs are the live jobs named Prefix…; QueueErr is why they could not
	// be listed (nothing is submitted, cancelled or given up then).
	Jobs     []slurm.Job
	QueueErr error
	Groups   []*store.Group
	Nodes    map[string]gossip.Tag
	// Script renders the batch script of a job of d.
	Script func(d Deployment) string
}

// Plan is what the executor does and what the reconciler and the API read.
type Plan struct {
	Submit []Submit
	Cancel []Cancel
	// Reserved maps each node of a running job to the deployment the job
	// is for: no other deployment is placed there.
	Reserved map[string]string
	// Expiring: these groups' jobs end within the handover lead (or were
	// signalled): each is replaced by a replica on a new job, then drained.
	Expiring map[string]string
	// Ended: these groups' jobs are gone; the groups are deleted.
	Ended map[string]string
	// Short says per deployment why it cannot scale now.
	Short map[string]string
	// Jobs are each deployment's live jobs, for get and describe.
	Jobs   map[string][]slurm.Job
	Events []Event
}

// Submit is one job to queue for a deployment.
type Submit struct {
	Deployment string
	Request    slurm.Request
	Why        string
}

// Cancel is one job to end.
type Cancel struct {
	Deployment, Job, Why string
}

// Event is a line for `shoal describe deployment`.
type Event struct {
	Deployment, Key, Msg string
}

// Request is the job of one replica of d.
func Request(prefix string, d Deployment, script string) slurm.Request {
	s, res := d.Spec.Slurm, d.Spec.Resources
	return slurm.Request{Name: prefix + d.Name, Partition: s.Partition, Account: s.Account, QoS: s.QoS, Nodes: res.Nodes, GRES: s.GRES,
		Time: time.Duration(s.TimeLimitMinutes) * time.Minute, Signal: time.Duration(s.HandoverLeadSeconds) * time.Second,
		Options: s.Options, Comment: "shoal deployment " + d.Name, Script: script}
}

// Lead is d's handover lead.
func Lead(d *spec.Deployment) time.Duration {
	return time.Duration(d.Slurm.HandoverLeadSeconds) * time.Second
}

// Decide is the Slurm node source's decision.
func Decide(s Snapshot) *Plan {
	p := &Plan{Reserved: map[string]string{}, Expiring: map[string]string{}, Ended: map[string]string{}, Short: map[string]string{},
		Jobs: map[string][]slurm.Job{}}
	deps := map[string]Deployment{}
	for _, d := range s.Deployments {
		deps[d.Name] = d
	}
	byJob := map[string]*store.Group{}
	for _, g := range s.Groups {
		if g.SlurmJob != "" {
			byJob[g.SlurmJob] = g
		}
	}
	nodesOf := map[string][]gossip.Tag{}
	for _, t := range s.Nodes {
		if t.SlurmJob != "" {
			nodesOf[t.SlurmJob] = append(nodesOf[t.SlurmJob], t)
		}
	}
	live := map[string]bool{}
	for _, j := range s.Jobs {
		live[j.ID] = true
		dep := strings.TrimPrefix(j.Name, s.Prefix)
		if _, ok := deps[dep]; !ok || !strings.HasPrefix(j.Name, s.Prefix) {
			if s.QueueErr == nil && j.Active() {
				p.Cancel = append(p.Cancel, Cancel{Deployment: dep, Job: j.ID, Why: "its deployment is gone (or no longer takes its nodes from Slurm)"})
			}
			continue
		}
		p.Jobs[dep] = append(p.Jobs[dep], j)
	}
	// Nodes of a deployment's jobs are its own; while Slurm cannot be
	// asked, the stored groups still say which jobs are whose.
	for _, g := range s.Groups {
		if g.SlurmJob != "" {
			for _, t := range nodesOf[g.SlurmJob] {
				p.Reserved[t.ID] = g.Deployment
			}
		}
	}
	for dep, jobs := range p.Jobs {
		for _, j := range jobs {
			for _, t := range nodesOf[j.ID] {
				p.Reserved[t.ID] = dep
			}
		}
	}
	names := make([]string, 0, len(deps))
	for n := range deps {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		decide(s, p, deps[n], byJob, nodesOf, live)
	}
	return p
}

func (p *Plan) event(dep, key, format string, args ...any) {
	p.Events = append(p.Events, Event{Deployment: dep, Key: key, Msg: fmt.Sprintf(format, args...)})
}

// expiring says why job j (with nodes) must be handed over ("" if not).
func expiring(now time.Time, lead time.Duration, j slurm.Job, nodes []gossip.Tag) string {
	for _, t := range nodes {
		if t.Leaving {
			return fmt.Sprintf("Slurm signalled job %s (node %s is leaving)", j.ID, t.ID)
		}
	}
	ends := j.Ends
	if ends.IsZero() {
		for _, t := range nodes {
			if t.SlurmEnd > 0 {
				ends = time.Unix(t.SlurmEnd, 0)
			}
		}
	}
	if j.State != slurm.StatePending && !ends.IsZero() && ends.Sub(now) <= lead {
		// No countdown in the text: the reason stays the same from pass to
		// pass, so its event is shown once.
		return fmt.Sprintf("job %s ends at %s UTC", j.ID, ends.UTC().Format(time.TimeOnly))
	}
	return ""
}

func decide(s Snapshot, p *Plan, d Deployment, byJob map[string]*store.Group, nodesOf map[string][]gossip.Tag, live map[string]bool) {
	lead := Lead(d.Spec)
	if s.QueueErr != nil {
		p.Short[d.Name] = fmt.Sprintf("cannot scale: %v; serving replicas go on, and no job is submitted or cancelled until Slurm answers", s.QueueErr)
		p.event(d.Name, "slurm/"+d.Name, "%s", p.Short[d.Name])
		// Handovers still follow the nodes' own word.
		for _, g := range s.Groups {
			if g.Deployment == d.Name && g.SlurmJob != "" {
				if why := expiring(s.Now, lead, slurm.Job{ID: g.SlurmJob, State: slurm.StateRunning}, nodesOf[g.SlurmJob]); why != "" {
					p.Expiring[g.ID] = why
				}
			}
		}
		return
	}
	for _, g := range s.Groups {
		if g.Deployment == d.Name && g.SlurmJob != "" && !live[g.SlurmJob] {
			p.Ended[g.ID] = fmt.Sprintf("its Slurm job %s ended", g.SlurmJob)
		}
	}
	jobs := p.Jobs[d.Name]
	var covering []slurm.Job
	for _, j := range jobs {
		if !j.Active() {
			continue // completing: its nodes are on their way out
		}
		g := byJob[j.ID]
		if why := expiring(s.Now, lead, j, nodesOf[j.ID]); why != "" {
			switch {
			case g == nil: // its replica was handed over and released
				p.Cancel = append(p.Cancel, Cancel{Deployment: d.Name, Job: j.ID, Why: "handed over (" + why + ")"})
				continue
			case g.Draining():
				continue
			}
			p.Expiring[g.ID] = why
			p.event(d.Name, "handover/"+g.ID, "handing replica %s over to a new job: %s", g.ID, why)
			continue
		}
		if g != nil && g.Draining() {
			continue // scaled in: cancelled once released
		}
		covering = append(covering, j)
		if j.State == slurm.StatePending {
			wait := s.Now.Sub(j.Submitted)
			if warn := time.Duration(d.Spec.Slurm.QueueWaitWarningSeconds) * time.Second; !j.Submitted.IsZero() && wait >= warn {
				p.event(d.Name, "queue/"+j.ID, "Slurm job %s has been pending for %v (reason: %s), over slurm.queueWaitWarningSeconds (%v); the replica waits for it",
					j.ID, wait.Round(time.Second), j.Reason, warn)
			}
		}
	}
	switch n := len(covering) - d.Desired; {
	case n < 0:
		for i := 0; i < -n; i++ {
			p.Submit = append(p.Submit, Submit{Deployment: d.Name, Request: Request(s.Prefix, d, s.Script(d)),
				Why: fmt.Sprintf("%d replica(s) wanted, %d job(s) pending or running", d.Desired, len(covering)+i)})
		}
	case n > 0:
		// Surplus: pending jobs first, then running ones no replica uses,
		// newest first; a job whose replica serves waits for its drain.
		sort.SliceStable(covering, func(a, b int) bool {
			pa, pb := covering[a].State == slurm.StatePending, covering[b].State == slurm.StatePending
			if pa != pb {
				return pa
			}
			return jobNum(covering[a].ID) > jobNum(covering[b].ID)
		})
		for _, j := range covering {
			if n == 0 {
				break
			}
			if byJob[j.ID] != nil {
				continue
			}
			p.Cancel = append(p.Cancel, Cancel{Deployment: d.Name, Job: j.ID, Why: fmt.Sprintf("scaled in to %d replica(s)", d.Desired)})
			n--
		}
	}
}

func jobNum(id string) int {
	n := 0
	for _, c := range id {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}
