package rdma

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Check is one preflight verdict.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// MinShmBytes is the /dev/shm size below which NCCL's shared-memory transport
// fails on 8 GPUs (run_cluster.sh gives containers 10.24 GB).
const MinShmBytes = 8 << 30

// capIPCLock is CAP_IPC_LOCK's bit in /proc/self/status CapEff.
const capIPCLock = 14

// Preflight checks what RDMA (and NCCL in general) needs from the host.
// needRDMA says whether adapters were found (memlock matters only then).
func Preflight(needRDMA bool) []Check {
	var out []Check
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl); err == nil {
		ok := rl.Cur == unix.RLIM_INFINITY || rl.Cur >= 1<<30 || !needRDMA
		d := "unlimited"
		if rl.Cur != unix.RLIM_INFINITY {
			d = fmt.Sprintf("%d KiB", rl.Cur>>10)
		}
		if !ok {
			d += ": RDMA needs memlock unlimited (LimitMEMLOCK=infinity in the unit)"
		}
		out = append(out, Check{Name: "memlock", OK: ok, Detail: d})
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err == nil {
		size := st.Blocks * uint64(st.Bsize)
		ok := size >= MinShmBytes
		d := fmt.Sprintf("%.1f GiB", float64(size)/(1<<30))
		if !ok {
			d += fmt.Sprintf(": NCCL needs at least %d GiB", MinShmBytes>>30)
		}
		out = append(out, Check{Name: "/dev/shm", OK: ok, Detail: d})
	} else {
		out = append(out, Check{Name: "/dev/shm", OK: false, Detail: "not mounted: " + err.Error()})
	}
	ipcLock := hasCap(capIPCLock)
	out = append(out, Check{Name: "IPC_LOCK", OK: ipcLock || !needRDMA, Detail: map[bool]string{true: "held", false: "missing: containers need --cap-add IPC_LOCK for RDMA"}[ipcLock]})
	return out
}

func hasCap(bit uint) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && n&(1<<bit) != 0
		}
	}
	return false
}
