package gpu

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/shoalhq/shoal/gpu/gputest"
)

// MockFaultsEnv names a file the mock backend reads injected faults from, one
// per line: "xid GPU CODE" or "ecc GPU" (double-bit ECC). For fault tests of
// whole agents; the real NVML backend ignores it.
const MockFaultsEnv = "SHOAL_MOCK_GPU_FAULTS"

// New returns the inspector for a backend name: "nvml" (the host's driver; no
// driver gives zero GPUs), "none", or "mock:h200xN" (go-nvml's H200 mock with
// N GPUs, 1 ≤ N ≤ 8, through the same NVML code path).
func New(backend string) (Inspector, error) {
	switch {
	case backend == "" || backend == "nvml":
		return &fallback{primary: NewNVML(nvml.New())}, nil // satisfies Watcher too
	case backend == "none":
		return Null{}, nil
	case strings.HasPrefix(backend, "mock:h200x"):
		n, err := strconv.Atoi(strings.TrimPrefix(backend, "mock:h200x"))
		if err != nil || n < 1 || n > 8 {
			return nil, fmt.Errorf("gpu backend %q: want mock:h200x1 … mock:h200x8", backend)
		}
		f := gputest.NewH200(n)
		if p := os.Getenv(MockFaultsEnv); p != "" {
			f.FaultsFile(p)
		}
		return NewNVML(f), nil
	default:
		return nil, fmt.Errorf("unknown gpu backend %q: one of nvml, none, mock:h200x8", backend)
	}
}
