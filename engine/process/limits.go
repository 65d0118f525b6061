package process

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// RaiseLimits raises the agent's soft open-file and locked-memory limits to
// their hard limits, which the engines it starts inherit: Ray and vLLM open
// many sockets, and RDMA registers (locks) large buffers. Under the systemd
// unit the hard memlock limit is infinity (LimitMEMLOCK=infinity). It returns
// the resulting soft limits (unix.RLIM_INFINITY for unlimited).
func RaiseLimits() (nofile, memlock uint64) {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil {
		l.Cur = l.Max
		// syscall.Setrlimit (not unix's) also tells os/exec to hand this
		// limit to children instead of the limit the process started with.
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
		nofile = l.Cur
	}
	var m unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_MEMLOCK, &m) == nil {
		m.Cur = m.Max
		_ = unix.Setrlimit(unix.RLIMIT_MEMLOCK, &m)
		memlock = m.Cur
	}
	return nofile, memlock
}
