package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// notifySocket listens where a Type=notify service reports its state.
func notifySocket(t *testing.T) (string, <-chan string) {
	p := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: p, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	ch := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := c.ReadFromUnix(buf)
			if err != nil {
				return
			}
			ch <- string(buf[:n])
		}
	}()
	return p, ch
}

func waitMsg(t *testing.T, ch <-chan string, want string, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m := <-ch:
			if strings.Contains(m, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %q from the daemon within %v", want, d)
		}
	}
}

// TestSystemdNotify: under systemd (Type=notify), the coordinator reports
// READY=1 once it serves, and an agent only once it fingerprinted its GPUs
// and joined the gossip — not while its seed is unreachable. SIGTERM makes
// each report STOPPING=1 and leave.
func TestSystemdNotify(t *testing.T) {
	addrs := freeAddrs(t, "127.0.22.1", 3)
	gossipPort := strings.Split(addrs[2], ":")[1]
	dir := t.TempDir()
	start := func(sock string, args ...string) *exec.Cmd {
		cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
		logf, _ := os.Create(filepath.Join(dir, args[0]+".log"))
		cmd.Stdout, cmd.Stderr = logf, logf
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		return cmd
	}
	// The agent starts first: its seed is not there yet, so it is not ready.
	asock, ach := notifySocket(t)
	agent := start(asock, "agent", "--insecure", "--node-id", "n1", "--address", "127.0.22.2", "--join", addrs[2],
		"--state-dir", filepath.Join(dir, "n1"), "--gpu-backend", "mock:h200x8", "--gossip-profile", "fast")
	select {
	case m := <-ach:
		require.NotContains(t, m, "READY=1", "ready before joining the cluster")
	case <-time.After(2 * time.Second):
	}
	csock, cch := notifySocket(t)
	coord := start(csock, "coordinator", "--insecure", "--no-api-keys", "--address", "127.0.22.1", "--gossip-port", gossipPort,
		"--api", addrs[0], "--router", addrs[1], "--metrics-addr=", "--data-dir", filepath.Join(dir, "coord"), "--gossip-profile", "fast")
	waitMsg(t, cch, "READY=1", 20*time.Second)
	waitMsg(t, ach, "READY=1", 30*time.Second)
	require.NoError(t, agent.Process.Signal(os.Interrupt))
	waitMsg(t, ach, "STOPPING=1", 20*time.Second)
	require.NoError(t, coord.Process.Signal(os.Interrupt))
	waitMsg(t, cch, "STOPPING=1", 20*time.Second)
}
