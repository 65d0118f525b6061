package agent

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/shoalhq/shoal/gpu"
	"github.com/shoalhq/shoal/rdma"
)

// HostInventory is what the agent knows about its host's hardware: the Agent
// API's Status carries it whole, the gossip tag a summary.
type HostInventory struct {
	GPU       *gpu.Inventory    `json:"gpu"`
	RDMA      []rdma.HCA        `json:"rdma"`
	RDMASum   string            `json:"rdma_summary"`
	Interface string            `json:"interface,omitempty"`
	NCCLEnv   map[string]string `json:"nccl_env"`
	Affinity  []rdma.Affinity   `json:"gpu_hca_affinity,omitempty"`
	Preflight []rdma.Check      `json:"preflight"`
	// Visible lists the owned GPUs' UUIDs (CUDA_VISIBLE_DEVICES) when the
	// agent owns a subset of the host's GPUs; empty when it owns them all.
	Visible string `json:"visible,omitempty"`
	// Events are the critical GPU events seen since the agent started; they
	// keep their GPU unhealthy until the agent restarts (after a GPU reset).
	Events []gpu.Event `json:"gpu_events,omitempty"`
}

// InspectHost reads GPUs and RDMA adapters and derives NCCL settings for a
// node whose engines use address. override (the agent's engine_env) wins.
func InspectHost(ctx context.Context, ins gpu.Inspector, sc *rdma.Scanner, address string, override map[string]string) (*HostInventory, error) {
	inv, err := ins.Inspect(ctx)
	if err != nil {
		return nil, fmt.Errorf("gpu inventory: %w", err)
	}
	hcas, err := sc.Scan(ctx)
	if err != nil {
		return nil, err
	}
	h := &HostInventory{GPU: inv, RDMA: hcas, RDMASum: rdma.Summary(hcas), Preflight: rdma.Preflight(len(hcas) > 0)}
	if address != "" {
		if name, err := rdma.IfaceFor(address, rdma.HostInterfaces); err == nil {
			h.Interface = name
		}
	}
	h.NCCLEnv = rdma.NCCLEnv(hcas, h.Interface, override)
	var pci []string
	var numa []int
	for _, d := range inv.Devices {
		pci, numa = append(pci, d.PCIBusID), append(numa, d.NUMANode)
	}
	h.Affinity = rdma.GPUAffinity(sc.SysRoot, pci, numa, hcas)
	return h, nil
}

// own keeps only the GPUs with the given NVML indices, device (minor)
// numbers or UUIDs (none: all).
func (h *HostInventory) own(indices, minors []int, uuids []string) error {
	if len(indices) == 0 && len(minors) == 0 && len(uuids) == 0 {
		return nil
	}
	indices = append([]int(nil), indices...)
	for _, m := range minors {
		found := false
		for i, d := range h.GPU.Devices {
			// A device whose minor number NVML did not say is taken for its index.
			if d.Minor == m || d.Minor < 0 && d.Index == m {
				indices, found = append(indices, i), true
				break
			}
		}
		if !found {
			return fmt.Errorf("gpus: no GPU of this host is /dev/nvidia%d (Slurm gave this step GPU %d)", m, m)
		}
	}
	for _, u := range uuids {
		found := false
		for i, d := range h.GPU.Devices {
			if d.UUID == u {
				indices, found = append(indices, i), true
				break
			}
		}
		if !found {
			return fmt.Errorf("gpus: no GPU of this host has UUID %q", u)
		}
	}
	var kept []gpu.Device
	var ids []string
	seen := map[int]bool{}
	for _, i := range indices {
		if i < 0 || i >= len(h.GPU.Devices) {
			return fmt.Errorf("gpus: index %d, but this host has %d GPU(s)", i, len(h.GPU.Devices))
		}
		if seen[i] {
			continue
		}
		seen[i] = true
		d := h.GPU.Devices[i]
		kept = append(kept, d)
		ids = append(ids, d.UUID)
	}
	h.GPU.Devices = kept
	h.Visible = strings.Join(ids, ",")
	return nil
}

// clone copies what the supervisor changes in place (GPU devices, events):
// the Status API may still read the previous inventory.
func (h *HostInventory) clone() *HostInventory {
	c := *h
	g := *h.GPU
	g.Devices = append([]gpu.Device(nil), h.GPU.Devices...)
	for i := range g.Devices {
		g.Devices[i].Reasons = append([]string(nil), g.Devices[i].Reasons...)
	}
	c.GPU = &g
	c.Events = append([]gpu.Event(nil), h.Events...)
	return &c
}

// unhealthy says why the host cannot serve ("" when every GPU is healthy).
func (h *HostInventory) unhealthy() string {
	if h == nil || h.GPU.Healthy() {
		return ""
	}
	var reasons []string
	for _, d := range h.GPU.Devices {
		for _, r := range d.Reasons {
			reasons = append(reasons, fmt.Sprintf("GPU %d: %s", d.Index, r))
		}
	}
	if len(reasons) == 0 {
		return "a GPU is unhealthy"
	}
	return strings.Join(reasons, "; ")
}

// markEvents applies the sticky critical events to a fresh GPU inventory.
func (h *HostInventory) markEvents() {
	for _, ev := range h.Events {
		var d *gpu.Device
		for i := range h.GPU.Devices {
			if h.GPU.Devices[i].Index == ev.Index {
				d = &h.GPU.Devices[i]
			}
		}
		if d == nil {
			continue // a GPU this agent does not own
		}
		d.Healthy = false
		found := false
		for _, r := range d.Reasons {
			found = found || r == ev.Reason
		}
		if !found {
			d.Reasons = append(d.Reasons, ev.Reason)
		}
	}
}

// minMemGiB is the smallest GPU memory, for placement.
func (h *HostInventory) minMemGiB() int {
	m := 0
	for i, d := range h.GPU.Devices {
		g := int(d.MemoryMiB / 1024)
		if i == 0 || g < m {
			m = g
		}
	}
	return m
}

// watchGPUs forwards critical GPU events to the supervisor loop.
func (a *Agent) watchGPUs(ctx context.Context) {
	w, ok := a.ins.(gpu.Watcher)
	if !ok {
		return
	}
	events := make(chan gpu.Event, 16)
	go func() {
		if err := w.Watch(ctx, events); err != nil {
			a.log.Warn("gpu event watch unavailable; relying on periodic checks", "err", err)
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-events:
			if !ev.Critical {
				a.log.Info("gpu event (not a hardware fault)", "gpu", ev.Index, "reason", ev.Reason)
				continue
			}
			a.log.Error("gpu fault", "gpu", ev.Index, "uuid", ev.UUID, "reason", ev.Reason)
			_ = a.do(ctx, func() error {
				hw := a.hw.clone()
				hw.Events = append(hw.Events, ev)
				hw.markEvents()
				a.setHardware(hw)
				return nil
			})
		}
	}
}

// reinspect re-reads the hardware periodically: remapping failures, pending
// retirements, NVLinks down and lost GPUs show up here.
func (a *Agent) reinspect(ctx context.Context) {
	if a.cfg.InspectInterval <= 0 {
		return
	}
	t := time.NewTicker(a.cfg.InspectInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		hw, err := InspectHost(ctx, a.ins, a.scanner, a.cfg.Address, a.cfg.EngineEnv)
		if err == nil {
			err = hw.own(a.cfg.GPUs, a.cfg.GPUMinors, a.cfg.GPUUUIDs)
		}
		if err != nil {
			a.log.Warn("periodic hardware check failed", "err", err)
			continue
		}
		_ = a.do(ctx, func() error {
			hw.Events = append([]gpu.Event(nil), a.hw.Events...)
			hw.markEvents()
			a.setHardware(hw)
			return nil
		})
	}
}

// setHardware installs a new inventory (loop): an unhealthy node's run is
// failed by the next decision, and gossip shows the node unhealthy.
func (a *Agent) setHardware(hw *HostInventory) {
	a.hw = hw
	a.poke()
}
