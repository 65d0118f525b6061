package gpu

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Device is one GPU as the agent reports it. Queries the driver does not
// support on a device are listed in Unsupported and leave their field zero.
type Device struct {
	Index int `json:"index"`
	// Minor is the device's /dev/nvidiaN number (-1 unknown): what Slurm's
	// GPU ids (SLURM_STEP_GPUS) name, even where cgroups renumber the
	// devices a job sees.
	Minor         int    `json:"minor"`
	UUID          string `json:"uuid"`
	Name          string `json:"name"`
	MemoryMiB     uint64 `json:"memory_mib"`
	MemoryUsedMiB uint64 `json:"memory_used_mib"`
	// ComputeCapability is "major.minor" (9.0 for Hopper).
	ComputeCapability string `json:"compute_capability,omitempty"`
	PCIBusID          string `json:"pci_bus_id,omitempty"`
	// NUMANode is -1 when unknown.
	NUMANode int `json:"numa_node"`
	// NVLinks holds each supported link's state: true when active.
	NVLinks                 []bool  `json:"nvlinks,omitempty"`
	ECCEnabled              bool    `json:"ecc_enabled"`
	ECCVolatileUncorrected  uint64  `json:"ecc_volatile_uncorrected"`
	ECCAggregateUncorrected uint64  `json:"ecc_aggregate_uncorrected"`
	RemappedRowsCorrectable int     `json:"remapped_rows_correctable"`
	RemappedRowsUncorrect   int     `json:"remapped_rows_uncorrectable"`
	RemapPending            bool    `json:"remap_pending"`
	RemapFailure            bool    `json:"remap_failure"`
	RetiredPagesPending     bool    `json:"retired_pages_pending"`
	Processes               int     `json:"processes"`
	TemperatureC            int     `json:"temperature_c"`
	PowerW                  float64 `json:"power_w"`
	// Unsupported names the queries this device or driver does not support.
	Unsupported []string `json:"unsupported,omitempty"`
	Healthy     bool     `json:"healthy"`
	// Reasons say why the device is unhealthy.
	Reasons []string `json:"reasons,omitempty"`
}

// Inventory is what Inspect found.
type Inventory struct {
	DriverVersion string   `json:"driver_version"`
	CUDAVersion   string   `json:"cuda_version"`
	NVMLVersion   string   `json:"nvml_version"`
	Devices       []Device `json:"devices"`
}

// Model is the short model name used for placement ("H200"), from the first device.
func (inv *Inventory) Model() string {
	if inv == nil || len(inv.Devices) == 0 {
		return ""
	}
	return ShortModel(inv.Devices[0].Name)
}

// Healthy reports whether every device is healthy.
func (inv *Inventory) Healthy() bool {
	for _, d := range inv.Devices {
		if !d.Healthy {
			return false
		}
	}
	return true
}

// ShortModel turns "NVIDIA H200 SXM5 141GB" into "H200".
func ShortModel(name string) string {
	for _, f := range strings.Fields(name) {
		if f == "NVIDIA" || f == "Tesla" {
			continue
		}
		return f
	}
	return name
}

// Inspector reads the GPU inventory.
type Inspector interface {
	Inspect(ctx context.Context) (*Inventory, error)
}

// ErrNoDriver means NVML could not be loaded: the host has no NVIDIA driver.
var ErrNoDriver = errors.New("nvidia driver not found")

// Null is the inspector of a host without GPUs.
type Null struct{}

// Inspect reports no GPUs.
func (Null) Inspect(context.Context) (*Inventory, error) { return &Inventory{}, nil }

// NVML reads devices through an nvml.Interface.
type NVML struct {
	lib        nvml.Interface
	registered atomic.Int32
}

// NewNVML wraps lib (nvml.New() for the real library, a fake in tests).
func NewNVML(lib nvml.Interface) *NVML { return &NVML{lib: lib} }

// query runs one NVML call. NOT_SUPPORTED (or a binding without the call)
// is recorded as unsupported; a lost GPU makes the device unhealthy.
// minor is dev's minor number, or -1 (it is an identity, not a health
// reading: unknown is not "unsupported").
func minor(dev nvml.Device) (m int) {
	defer func() {
		if recover() != nil {
			m = -1
		}
	}()
	if v, ret := dev.GetMinorNumber(); ret == nvml.SUCCESS {
		return v
	}
	return -1
}

func query[T any](d *Device, name string, f func() (T, nvml.Return)) (v T, ok bool) {
	defer func() {
		// A binding or fake that lacks the call panics; to the agent that is
		// the same as a driver that does not support it.
		if recover() != nil {
			d.Unsupported = append(d.Unsupported, name)
			ok = false
		}
	}()
	v, ret := f()
	switch ret {
	case nvml.SUCCESS:
		return v, true
	case nvml.ERROR_GPU_IS_LOST:
		d.unhealthy("GPU is lost (" + name + "): reset or replace it")
	default:
		d.Unsupported = append(d.Unsupported, name)
	}
	return v, false
}

func (d *Device) unhealthy(reason string) {
	d.Healthy = false
	for _, r := range d.Reasons {
		if r == reason {
			return
		}
	}
	d.Reasons = append(d.Reasons, reason)
}

// Inspect initialises NVML, reads every device and shuts NVML down again.
func (n *NVML) Inspect(_ context.Context) (*Inventory, error) {
	if ret := n.lib.Init(); ret != nvml.SUCCESS {
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND || ret == nvml.ERROR_DRIVER_NOT_LOADED {
			return nil, fmt.Errorf("nvml init: %w", ErrNoDriver)
		}
		return nil, fmt.Errorf("nvml init: %s", n.lib.ErrorString(ret))
	}
	defer n.lib.Shutdown()
	inv := &Inventory{}
	if v, ret := n.lib.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		inv.DriverVersion = v
	}
	if v, ret := n.lib.SystemGetNVMLVersion(); ret == nvml.SUCCESS {
		inv.NVMLVersion = v
	}
	if v, ret := n.lib.SystemGetCudaDriverVersion(); ret == nvml.SUCCESS {
		inv.CUDAVersion = fmt.Sprintf("%d.%d", v/1000, v%1000/10)
	}
	count, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("nvml device count: %s", n.lib.ErrorString(ret))
	}
	for i := 0; i < count; i++ {
		dev, ret := n.lib.DeviceGetHandleByIndex(i)
		d := Device{Index: i, Minor: -1, Healthy: true, NUMANode: -1}
		if ret != nvml.SUCCESS {
			// A device NVML cannot open is reported, unhealthy, rather than hidden.
			d.Name = "unknown"
			d.unhealthy("NVML cannot open the device: " + n.lib.ErrorString(ret))
			inv.Devices = append(inv.Devices, d)
			continue
		}
		readDevice(dev, &d)
		inv.Devices = append(inv.Devices, d)
	}
	return inv, nil
}

// readDevice fills d from dev and applies the periodic health rules.
func readDevice(dev nvml.Device, d *Device) {
	d.UUID, _ = query(d, "uuid", dev.GetUUID)
	d.Minor = minor(dev)
	d.Name, _ = query(d, "name", dev.GetName)
	if m, ok := query(d, "memory", dev.GetMemoryInfo); ok {
		d.MemoryMiB, d.MemoryUsedMiB = m.Total/(1<<20), m.Used/(1<<20)
	}
	if cc, ok := query(d, "compute_capability", func() ([2]int, nvml.Return) {
		a, b, r := dev.GetCudaComputeCapability()
		return [2]int{a, b}, r
	}); ok {
		d.ComputeCapability = fmt.Sprintf("%d.%d", cc[0], cc[1])
	}
	if p, ok := query(d, "pci", dev.GetPciInfo); ok {
		d.PCIBusID = busID(p.BusId[:])
	}
	if v, ok := query(d, "numa_node", dev.GetNumaNodeId); ok {
		d.NUMANode = v
	}
	for l := 0; l < nvml.NVLINK_MAX_LINKS; l++ {
		st, ret := safeLink(dev, l)
		if ret != nvml.SUCCESS {
			break // links are numbered densely; the first unsupported one ends the list
		}
		d.NVLinks = append(d.NVLinks, st == nvml.FEATURE_ENABLED)
	}
	if m, ok := query(d, "ecc_mode", func() (nvml.EnableState, nvml.Return) { cur, _, r := dev.GetEccMode(); return cur, r }); ok {
		d.ECCEnabled = m == nvml.FEATURE_ENABLED
	}
	if d.ECCEnabled {
		d.ECCVolatileUncorrected, _ = query(d, "ecc_volatile", func() (uint64, nvml.Return) {
			return dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC)
		})
		d.ECCAggregateUncorrected, _ = query(d, "ecc_aggregate", func() (uint64, nvml.Return) {
			return dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.AGGREGATE_ECC)
		})
	}
	if rr, ok := query(d, "remapped_rows", func() ([4]int, nvml.Return) {
		c, u, pend, fail, r := dev.GetRemappedRows()
		return [4]int{c, u, b2i(pend), b2i(fail)}, r
	}); ok {
		d.RemappedRowsCorrectable, d.RemappedRowsUncorrect, d.RemapPending, d.RemapFailure = rr[0], rr[1], rr[2] == 1, rr[3] == 1
	}
	if st, ok := query(d, "retired_pages_pending", dev.GetRetiredPagesPendingStatus); ok {
		d.RetiredPagesPending = st == nvml.FEATURE_ENABLED
	}
	if ps, ok := query(d, "processes", dev.GetComputeRunningProcesses); ok {
		d.Processes = len(ps)
	}
	if t, ok := query(d, "temperature", func() (uint32, nvml.Return) { return dev.GetTemperature(nvml.TEMPERATURE_GPU) }); ok {
		d.TemperatureC = int(t)
	}
	if p, ok := query(d, "power", dev.GetPowerUsage); ok {
		d.PowerW = float64(p) / 1000
	}
	// Periodic health rules (the event watcher adds XIDs).
	if d.RemapFailure {
		d.unhealthy("row remapping failed: the GPU needs replacement")
	}
	if d.RemapPending {
		d.unhealthy("row remapping pending: reset the GPU")
	}
	if d.RetiredPagesPending {
		d.unhealthy("page retirement pending: reset the GPU")
	}
	for l, up := range d.NVLinks {
		if !up {
			d.unhealthy("NVLink " + strconv.Itoa(l) + " is down")
		}
	}
}

func safeLink(dev nvml.Device, l int) (st nvml.EnableState, ret nvml.Return) {
	defer func() {
		if recover() != nil {
			ret = nvml.ERROR_NOT_SUPPORTED
		}
	}()
	return dev.GetNvLinkState(l)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func busID(b []int8) string {
	var sb strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return sb.String()
}

// fallback reports zero GPUs when the driver is missing.
type fallback struct{ primary *NVML }

// Watch watches the real library's events (an error when there is no driver).
func (f *fallback) Watch(ctx context.Context, out chan<- Event) error {
	return f.primary.Watch(ctx, out)
}

// Registered reports the running watch's registrations.
func (f *fallback) Registered() int { return f.primary.Registered() }

func (f *fallback) Inspect(ctx context.Context) (*Inventory, error) {
	inv, err := f.primary.Inspect(ctx)
	if errors.Is(err, ErrNoDriver) {
		return &Inventory{}, nil
	}
	return inv, err
}
