package slurm

import (
	"fmt"
	"strconv"
	"strings"
)

// Alloc is what a task of a Slurm job step learns from its environment.
type Alloc struct {
	JobID string
	// Node is the Slurm node name (SLURMD_NODENAME); NodeIndex is the
	// node's index in the job (SLURM_NODEID) of NNodes.
	Node              string
	NodeIndex, NNodes int
	// NodeList is the job's nodes as Slurm writes them (SLURM_JOB_NODELIST).
	NodeList string
	// GPUs are the GPUs Slurm gave the step on this node, as Slurm names
	// them: device numbers (/dev/nvidiaN, whatever the job's cgroup lets
	// it see) or, where gres.conf says so, UUIDs (SLURM_STEP_GPUS, else
	// SLURM_JOB_GPUS, else CUDA_VISIBLE_DEVICES).
	// Empty: Slurm gave no GPUs (the step asked for none).
	GPUs []string
}

// Port bands: a job's agent and engines use the ports of its band, so that
// jobs sharing a node never clash. Band b shifts every port by b ×
// PortBandWidth; bands are 1…PortBands (0: no band, a systemd host).
const (
	PortBands     = 20
	PortBandWidth = 100
)

// FromEnv reads the allocation of the task whose environment get reads.
func FromEnv(get func(string) string) (Alloc, error) {
	a := Alloc{JobID: get("SLURM_JOB_ID"), Node: get("SLURMD_NODENAME"), NodeList: get("SLURM_JOB_NODELIST")}
	if a.JobID == "" {
		a.JobID = get("SLURM_JOBID")
	}
	if a.JobID == "" {
		return a, fmt.Errorf("--slurm: SLURM_JOB_ID is not set; run the agent as a Slurm job step (srun --ntasks-per-node=1 shoal agent --slurm …)")
	}
	if _, err := strconv.ParseUint(a.JobID, 10, 64); err != nil {
		return a, fmt.Errorf("--slurm: SLURM_JOB_ID %q is not a job id", a.JobID)
	}
	if a.Node == "" {
		return a, fmt.Errorf("--slurm: SLURMD_NODENAME is not set; run the agent as a Slurm job step")
	}
	for _, v := range []struct {
		name string
		dst  *int
	}{{"SLURM_NODEID", &a.NodeIndex}, {"SLURM_JOB_NUM_NODES", &a.NNodes}} {
		s := get(v.name)
		if s == "" {
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			return a, fmt.Errorf("--slurm: %s=%q is not a count", v.name, s)
		}
		*v.dst = n
	}
	gpus := get("SLURM_STEP_GPUS")
	if gpus == "" {
		gpus = get("SLURM_JOB_GPUS")
	}
	if gpus == "" {
		gpus = get("CUDA_VISIBLE_DEVICES")
	}
	if gpus == "NoDevFiles" {
		return a, fmt.Errorf("--slurm: Slurm set CUDA_VISIBLE_DEVICES=NoDevFiles: the step's GPUs have no device files in gres.conf; ask the admins for File= lines, or run the agent with --gpus")
	}
	for _, g := range strings.Split(gpus, ",") {
		if g = strings.TrimSpace(g); g != "" {
			a.GPUs = append(a.GPUs, g)
		}
	}
	return a, nil
}

// PortBand is the band of job id (1…PortBands).
func PortBand(jobID string) int {
	n, _ := strconv.ParseUint(jobID, 10, 64)
	return 1 + int(n%PortBands)
}

// NodeID is the agent's node id in an allocation: the Slurm node name and
// the job, since two jobs may share a node.
func (a Alloc) NodeID() string { return a.Node + "-j" + a.JobID }

// Indices splits GPUs into device numbers and UUIDs.
func (a Alloc) Indices() (idx []int, uuids []string) {
	for _, g := range a.GPUs {
		if n, err := strconv.Atoi(g); err == nil && n >= 0 {
			idx = append(idx, n)
		} else {
			uuids = append(uuids, g)
		}
	}
	return idx, uuids
}
