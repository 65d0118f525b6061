package gpu

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
)

// Device is one GPU as the agent reports it.
type Device struct {
	Index     int
	UUID      string
	Name      string
	MemoryMiB uint64
	Healthy   bool
}

// Inventory is what Inspect found.
type Inventory struct {
	DriverVersion string
	Devices       []Device
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
	lib nvml.Interface
}

// NewNVML wraps lib (nvml.New() for the real library, a mock in tests).
func NewNVML(lib nvml.Interface) *NVML { return &NVML{lib: lib} }

// Inspect initialises NVML, reads every device and shuts NVML down again.
func (n *NVML) Inspect(_ context.Context) (inv *Inventory, err error) {
	if ret := n.lib.Init(); ret != nvml.SUCCESS {
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND || ret == nvml.ERROR_DRIVER_NOT_LOADED {
			return nil, fmt.Errorf("nvml init: %w", ErrNoDriver)
		}
		return nil, fmt.Errorf("nvml init: %s", n.lib.ErrorString(ret))
	}
	defer n.lib.Shutdown()
	inv = &Inventory{}
	if v, ret := n.lib.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		inv.DriverVersion = v
	}
	count, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("nvml device count: %s", n.lib.ErrorString(ret))
	}
	for i := 0; i < count; i++ {
		dev, ret := n.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			// A device NVML cannot open is reported, unhealthy, rather than hidden.
			inv.Devices = append(inv.Devices, Device{Index: i, Name: "unknown", Healthy: false})
			continue
		}
		d := Device{Index: i, Healthy: true}
		if s, ret := dev.GetUUID(); ret == nvml.SUCCESS {
			d.UUID = s
		}
		if s, ret := dev.GetName(); ret == nvml.SUCCESS {
			d.Name = s
		}
		if m, ret := dev.GetMemoryInfo(); ret == nvml.SUCCESS {
			d.MemoryMiB = m.Total / (1 << 20)
		}
		inv.Devices = append(inv.Devices, d)
	}
	return inv, nil
}

// New returns the inspector for a backend name: "nvml" (the host's driver; no
// driver gives zero GPUs), "none", or "mock:h200xN" (go-nvml's H200 mock with N
// GPUs, 1 ≤ N ≤ 8).
func New(backend string) (Inspector, error) {
	switch {
	case backend == "" || backend == "nvml":
		return &fallback{primary: NewNVML(nvml.New())}, nil
	case backend == "none":
		return Null{}, nil
	case strings.HasPrefix(backend, "mock:h200x"):
		n, err := strconv.Atoi(strings.TrimPrefix(backend, "mock:h200x"))
		if err != nil || n < 1 || n > 8 {
			return nil, fmt.Errorf("gpu backend %q: want mock:h200x1 … mock:h200x8", backend)
		}
		return &limited{Inspector: NewNVML(dgxh200.New()), n: n}, nil
	default:
		return nil, fmt.Errorf("unknown gpu backend %q: one of nvml, none, mock:h200x8", backend)
	}
}

// fallback reports zero GPUs when the driver is missing.
type fallback struct{ primary Inspector }

func (f *fallback) Inspect(ctx context.Context) (*Inventory, error) {
	inv, err := f.primary.Inspect(ctx)
	if errors.Is(err, ErrNoDriver) {
		return &Inventory{}, nil
	}
	return inv, err
}

// limited keeps the first n devices of a mock.
type limited struct {
	Inspector
	n int
}

func (l *limited) Inspect(ctx context.Context) (*Inventory, error) {
	inv, err := l.Inspector.Inspect(ctx)
	if err != nil {
		return nil, err
	}
	if len(inv.Devices) > l.n {
		inv.Devices = inv.Devices[:l.n]
	}
	return inv, nil
}
