package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/security"
	"github.com/stretchr/testify/require"
)

// TestConsoleInABrowser runs `shoal dev` as a user does (5 agents, the demo
// deployment: 2 replicas of 2 nodes) and drives its web console in a real
// headless Chromium (Debian's chromium, through playwright-core from
// test/sdk/node; the checks are in test/sdk/node/console.mjs): the cluster
// view shows every node and both replicas with their heads; a head's agent
// killed shows within 2 s and the replica comes back on the spare; the
// deployments and replica views (charts, logs) fill; a playground chat
// streams; a browser that has not logged in is refused. Screenshots of each
// view go to $SHOAL_CONSOLE_SCREENSHOTS (default: shoal-console-screenshots
// in the temp directory), outside the repository.
func TestConsoleInABrowser(t *testing.T) {
	suite := filepath.Join("..", "sdk", "node")
	if _, err := os.Stat(filepath.Join(suite, "node_modules", "playwright-core")); err != nil {
		t.Fatalf("playwright-core is not installed: run `npm ci --prefix test/sdk/node` (.ci/run does): %v", err)
	}
	node, err := exec.LookPath("node")
	require.NoError(t, err, "node is needed (apt-get install nodejs)")
	browser := os.Getenv("SHOAL_CHROMIUM")
	if browser == "" {
		if browser, err = exec.LookPath("chromium"); err != nil {
			if os.Getenv("SHOAL_REQUIRE_BROWSER") == "1" {
				t.Fatal("chromium not installed (apt-get install chromium), or set SHOAL_CHROMIUM")
			}
			t.Skip("chromium not installed (apt-get install chromium), or set SHOAL_CHROMIUM")
		}
	}
	shots := os.Getenv("SHOAL_CONSOLE_SCREENSHOTS")
	if shots == "" {
		shots = filepath.Join(os.TempDir(), "shoal-console-screenshots")
	}

	const subnet = 38
	ip := fmt.Sprintf("127.0.%d.1", subnet)
	addrs := freeAddrs(t, ip, 5)
	_, gport, _ := net.SplitHostPort(addrs[4])
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dev := exec.Command(filepath.Join(binDir, "shoal"), "dev", "--dir", filepath.Join(dir, "cluster"), "--net", fmt.Sprintf("127.0.%d", subnet),
		"--gossip-port", gport, "--api", addrs[0], "--router", addrs[1], "--metrics-addr", addrs[2], "--console", addrs[3], "--load-seconds", "1")
	// shoal dev leaves a pointer to its CLI credentials in the temp
	// directory: this one's own, not a developer's running cluster's.
	dev.Env = append(os.Environ(), "TMPDIR="+dir)
	dev.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := dev.StdoutPipe()
	require.NoError(t, err)
	dev.Stderr = dev.Stdout
	require.NoError(t, dev.Start())
	exited := make(chan struct{})
	lines := make(chan string, 256)
	var devLog strings.Builder
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	go func() { _ = dev.Wait(); close(exited) }()
	t.Cleanup(func() {
		// Ctrl-C, as a user stops it: agents, engines, coordinator.
		_ = syscall.Kill(dev.Process.Pid, syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(40 * time.Second):
			_ = syscall.Kill(-dev.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			t.Logf("shoal dev printed:\n%s", devLog.String())
		}
	})

	// The console's address is printed next to the router's.
	linkRe := regexp.MustCompile(`^console: (http://\S+)$`)
	var link string
	ready := false
	for link == "" || !ready {
		select {
		case l, ok := <-lines:
			require.True(t, ok, "shoal dev exited before it was ready:\n%s", devLog.String())
			devLog.WriteString(l + "\n")
			if m := linkRe.FindStringSubmatch(l); m != nil {
				link = m[1]
				require.True(t, ready, "the console is printed after the router's ready line")
			}
			if strings.HasPrefix(l, "ready: http://"+addrs[1]) {
				ready = true
			}
		case <-ctx.Done():
			t.Fatalf("shoal dev did not become ready:\n%s", devLog.String())
		}
	}
	require.Contains(t, link, "http://"+addrs[3]+"/#token=shoal_")
	go func() {
		for l := range lines {
			devLog.WriteString(l + "\n")
		}
	}()

	cmd := exec.CommandContext(ctx, node, "console.mjs")
	cmd.Dir = suite
	cmd.Env = append(os.Environ(), "SHOAL_CONSOLE="+link, "SHOAL_CHROMIUM="+browser, "SHOAL_SCREENSHOTS="+shots, "SHOAL_NODES=5")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	var said []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		l := sc.Text()
		said = append(said, l)
		t.Log("browser:", l)
		if f := strings.Fields(l); len(f) == 3 && f[0] == "KILL" {
			pid := agentPid(t, filepath.Join(dir, "cluster"), f[1])
			at := time.Now().UnixMilli()
			require.NoError(t, syscall.Kill(pid, syscall.SIGKILL), "kill %s's agent", f[1])
			_, err := io.WriteString(stdin, "KILLED "+strconv.FormatInt(at, 10)+"\n")
			require.NoError(t, err)
		}
		if f := strings.Fields(l); len(f) == 4 && f[0] == "FAULT" {
			// The mock NVML's fault file: "xid GPU CODE" (gpu/backend.go).
			appendFault(t, filepath.Join(dir, "cluster", f[1]+"-gpu-faults"), "xid "+f[2]+" "+f[3])
			_, err := io.WriteString(stdin, "FAULTED\n")
			require.NoError(t, err)
		}
	}
	err = cmd.Wait()
	require.NoError(t, err, "the browser checks failed:\n%s\n%s", strings.Join(said, "\n"), stderr.String())
	require.Contains(t, said, "DONE")
	t.Logf("screenshots in %s", shots)
}

// agentPid finds the agent process of node id of the dev cluster in dir
// (its command line names its state directory).
func agentPid(t *testing.T, dir, id string) int {
	t.Helper()
	want := filepath.Join(dir, id)
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(args) < 2 || args[1] != "agent" {
			continue
		}
		for i, a := range args {
			if a == "--state-dir" && i+1 < len(args) && args[i+1] == want {
				pid, _ := strconv.Atoi(strings.Split(p, "/")[2])
				return pid
			}
		}
	}
	t.Fatalf("no agent process with --state-dir %s", want)
	return 0
}

// TestConsoleHTTPSAndItsRefusals serves the console over HTTPS with the
// coordinator's certificate and calls it as the CLI would: a cli
// certificate and a CLI token get in, an agent's certificate and no
// credentials do not; a coordinator refuses a console that would be open
// (--insecure) or in the clear (--console-cleartext) beyond loopback.
func TestConsoleHTTPSAndItsRefusals(t *testing.T) {
	const subnet = 39
	ip := fmt.Sprintf("127.0.%d.1", subnet)
	console := freeAddrs(t, ip, 1)[0]
	e := startCluster(t, subnet, 1, func(c *devcluster.Config) { c.ConsoleAddr, c.ConsoleHTTPS = console, true })
	tlsDir := e.c.TLSDir("cli")
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(security.CAFile(tlsDir))
	require.NoError(t, err)
	require.True(t, pool.AppendCertsFromPEM(pem))
	client := func(dir string, role security.Role) *http.Client {
		cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
		if dir != "" {
			c, err := tls.LoadX509KeyPair(security.CertFile(dir, role), security.KeyFile(dir, role))
			require.NoError(t, err)
			cfg.Certificates = []tls.Certificate{c}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 10 * time.Second}
	}
	get := func(c *http.Client, token string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, "https://"+console+"/api/cluster", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	var code int
	var body string
	require.Eventually(t, func() bool {
		code, body = get(client(tlsDir, security.RoleCLI), "")
		return code == 200 && strings.Contains(body, `"nodes":1`)
	},
		30*time.Second, 100*time.Millisecond, "a cli certificate: %d %s", code, body)
	code, body = get(client("", ""), e.c.ConsoleToken())
	require.Equal(t, 200, code, body)
	code, body = get(client("", ""), "")
	require.Equal(t, 401, code, body)
	require.Contains(t, body, "log in with a CLI token")
	code, body = get(client(e.c.TLSDir(devcluster.NodeID(0)), security.RoleAgent), "")
	require.Equal(t, 401, code, body)
	require.Contains(t, body, "may not use the console")
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + console + "/api/cluster")
	if err == nil {
		resp.Body.Close()
		require.NotEqual(t, 200, resp.StatusCode, "no cleartext answer from an HTTPS console")
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--insecure", "--console", "0.0.0.0:0"}, "open to anyone"},
		{[]string{"--tls-dir", e.c.TLSDir("coordinator"), "--gossip-key-file", filepath.Join(e.c.TLSDir("coordinator"), "gossip.key"),
			"--console", "0.0.0.0:0", "--console-cleartext"}, "in the clear"},
	} {
		args := append([]string{"coordinator", "--data-dir", t.TempDir(), "--api", freeAddrs(t, ip, 1)[0], "--router", "", "--metrics-addr", "",
			"--address", ip, "--gossip-port", "0", "--no-api-keys"}, tc.args...)
		out, err := exec.Command(filepath.Join(binDir, "shoal"), args...).CombinedOutput()
		require.Error(t, err, "%v: %s", tc.args, out)
		require.Contains(t, string(out), tc.want, "%v", tc.args)
	}
}
