package spec

import (
	"fmt"
	"slices"
	"strings"
)

// Slurm says that a deployment's nodes come from Slurm: each replica is
// one job of resources.nodes nodes, whose nodes start agents that join the
// cluster; the replica is placed on exactly those nodes, and handed over to
// a new job before the time limit (docs/design/slurm.md).
type Slurm struct {
	Partition string `yaml:"partition,omitempty" json:"partition,omitempty"`
	Account   string `yaml:"account,omitempty" json:"account,omitempty"`
	QoS       string `yaml:"qos,omitempty" json:"qos,omitempty"`
	// GRES per node; default gpu:<resources.gpusPerNode>.
	GRES string `yaml:"gres,omitempty" json:"gres,omitempty"`
	// TimeLimitMinutes is each job's --time.
	TimeLimitMinutes int `yaml:"timeLimitMinutes" json:"timeLimitMinutes"`
	// HandoverLeadSeconds: this long before a job's end the replacement
	// job is submitted and its replica brought up, and Slurm signals the
	// job's steps (--signal=USR1@lead). It must cover the queue wait you
	// expect, the weight load and the engine start (default 900).
	HandoverLeadSeconds int `yaml:"handoverLeadSeconds,omitempty" json:"handoverLeadSeconds,omitempty"`
	// QueueWaitWarningSeconds: a job pending longer is an event (default 1800).
	QueueWaitWarningSeconds int `yaml:"queueWaitWarningSeconds,omitempty" json:"queueWaitWarningSeconds,omitempty"`
	// Options are more sbatch options ("--exclusive", "--constraint=h200").
	Options []string `yaml:"options,omitempty" json:"options,omitempty"`
}

// Slurm defaults.
const (
	DefaultHandoverLeadSeconds     = 900
	DefaultQueueWaitWarningSeconds = 1800
)

// slurmOwned are the sbatch options shoal sets itself.
var slurmOwned = []string{"--job-name", "-J", "--nodes", "-N", "--ntasks-per-node", "--ntasks", "-n", "--gres", "--gpus", "-G",
	"--gpus-per-node", "--time", "-t", "--signal", "--parsable", "--test-only", "--wrap", "--partition", "-p", "--account", "-A",
	"--qos", "-q", "--comment", "--array", "-a", "--requeue", "--no-requeue", "--dependency", "-d", "--hold", "-H"}

func (s *Slurm) defaults(res Resources) {
	if s.GRES == "" && res.GPUsPerNode > 0 {
		s.GRES = fmt.Sprintf("gpu:%d", res.GPUsPerNode)
	}
	if s.HandoverLeadSeconds == 0 {
		s.HandoverLeadSeconds = DefaultHandoverLeadSeconds
	}
	if s.QueueWaitWarningSeconds == 0 {
		s.QueueWaitWarningSeconds = DefaultQueueWaitWarningSeconds
	}
}

func (s *Slurm) validate(bad func(field, format string, args ...any)) {
	if s.TimeLimitMinutes < 1 {
		bad("slurm.timeLimitMinutes", "is required: each replica's job asks Slurm for this time limit (minutes), got %d", s.TimeLimitMinutes)
	}
	if s.HandoverLeadSeconds < 0 || s.QueueWaitWarningSeconds < 0 {
		bad("slurm", "handoverLeadSeconds and queueWaitWarningSeconds must not be negative")
	}
	if s.TimeLimitMinutes > 0 && s.HandoverLeadSeconds*2 > s.TimeLimitMinutes*60 {
		bad("slurm.handoverLeadSeconds", "%d s is more than half the job's time limit (%d min): every job would be handing over for most of its life; raise timeLimitMinutes or lower the lead",
			s.HandoverLeadSeconds, s.TimeLimitMinutes)
	}
	for name, v := range map[string]string{"partition": s.Partition, "account": s.Account, "qos": s.QoS, "gres": s.GRES} {
		if strings.ContainsAny(v, " \t\n\"'=") {
			bad("slurm."+name, "%q has a space, quote or '='", v)
		}
	}
	for i, o := range s.Options {
		flag, _, _ := strings.Cut(o, "=")
		switch {
		case !strings.HasPrefix(o, "-") || strings.ContainsAny(o, "\n"):
			bad(fmt.Sprintf("slurm.options[%d]", i), "%q is not an sbatch option (--name or --name=value)", o)
		case slices.Contains(slurmOwned, flag):
			bad(fmt.Sprintf("slurm.options[%d]", i), "%s is set by shoal (each replica is one job of resources.nodes nodes, one agent per node); use the slurm fields", flag)
		}
	}
}

// ShiftPorts returns d with every engine port moved by off (a Slurm job's
// port band, so that jobs sharing a node never clash): the API, Ray, the
// rendezvous, KV events, the KV connector's and the DP coordinator's. The
// ports keep their distances, so what Validate checked still holds.
func ShiftPorts(d *Deployment, off int) *Deployment {
	if off == 0 {
		return d
	}
	c := *d
	e := &c.Engine
	e.KVEventsPort = KVEventsPortOf(&d.Engine) + off
	e.Port += off
	e.RayPort += off
	e.MasterPort += off
	if k := d.Engine.KVTransfer; k != nil {
		kc := *k
		if kc.SideChannelPort != 0 {
			kc.SideChannelPort += off
		}
		if kc.BootstrapPort != 0 {
			kc.BootstrapPort += off
		}
		e.KVTransfer = &kc
	}
	if dp := d.Engine.DataParallel; dp != nil {
		dc := *dp
		dc.RPCPort += off
		e.DataParallel = &dc
	}
	return &c
}
