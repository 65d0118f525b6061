// Package slurmtest runs a real Slurm cluster on one machine for tests and
// benchmarks: Debian's slurmctld and one slurmd per network-namespace host
// (each with its own hostname in a UTS namespace, its own spool directory,
// proctrack/linuxproc, GPUs as GRES on character devices), munge with a key
// of its own, and a shoal coordinator with --slurm whose jobs' nodes start
// agents on the simulator. With SHOAL_REQUIRE_SLURM=1 (CI) a machine
// without Slurm fails instead of skipping.
package slurmtest

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/shoalhq/shoal/test/chaos"
	"github.com/stretchr/testify/require"
)

// Subnet is the Slurm suite's network (the chaos suite has 10.213.77.).
const Subnet = "10.213.78."

// Need skips (or, in CI, fails) when this machine cannot run Slurm.
func Need(t testing.TB) {
	t.Helper()
	var missing []string
	for _, b := range []string{"slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "sinfo", "scontrol", "unshare", "ip"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	if len(missing) == 0 {
		return
	}
	msg := "the Slurm suite needs " + strings.Join(missing, ", ") + " (apt-get install slurm-wlm munge; run as root)"
	if os.Getenv("SHOAL_REQUIRE_SLURM") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Cluster is a real Slurm cluster of hosts n1…nN with 8 GPUs each.
type Cluster struct {
	t     testing.TB
	bins  string
	Dir   string
	Net   *chaos.Net
	hosts []string
	conf  string
	procs []*exec.Cmd
	ctld  *exec.Cmd
	// dbPort, dbdPort: MariaDB's and slurmdbd's, with accounting.
	dbPort, dbdPort int
}

// Start brings up munged, slurmctld and one slurmd per host, and waits
// until every node is idle.
func Start(t testing.TB, bins string, hosts int, partitions ...string) *Cluster {
	return StartOn(t, bins, Subnet, hosts, partitions...)
}

// StartOn is Start on another /24 ("10.213.79."), for a run beside the suite.
func StartOn(t testing.TB, bins, subnet string, hosts int, partitions ...string) *Cluster {
	return start(t, bins, subnet, hosts, false, partitions)
}

// StartWithAccounts is Start with Slurm's accounting: MariaDB, slurmdbd and
// AccountingStorageEnforce=associations, so that Slurm refuses an account
// (or QoS) it does not know; accounts proj1 and proj2 exist, root may use
// proj1 (and its own account, root).
func StartWithAccounts(t testing.TB, bins, subnet string, hosts int) *Cluster {
	return start(t, bins, subnet, hosts, true, nil)
}

func start(t testing.TB, bins, subnet string, hosts int, accounting bool, partitions []string) *Cluster {
	Need(t)
	if accounting {
		for _, b := range []string{"slurmdbd", "mariadbd", "mysql_install_db", "sacctmgr"} {
			if _, err := exec.LookPath(b); err != nil {
				msg := "Slurm's accounting needs " + b + " (apt-get install slurmdbd mariadb-server)"
				if os.Getenv("SHOAL_REQUIRE_SLURM") != "" {
					t.Fatal(msg)
				}
				t.Skip(msg)
			}
		}
	}
	dir, err := os.MkdirTemp("", "shoal-slurm-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	c := &Cluster{t: t, bins: bins, Dir: dir}
	names := map[string]int{}
	for i := 1; i <= hosts; i++ {
		h := "n" + strconv.Itoa(i)
		c.hosts = append(c.hosts, h)
		names[h] = i
	}
	c.Net, err = chaos.NewNetOn(subnet, names)
	require.NoError(t, err)
	t.Cleanup(c.stop)

	key := make([]byte, 1024)
	_, _ = rand.Read(key)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "munge.key"), key, 0o600))
	sock := filepath.Join(dir, "munge.sock")
	c.Spawn("munged", nil, "munged", "-F", "--force", "--socket="+sock, "--key-file="+filepath.Join(dir, "munge.key"),
		"--pid-file="+filepath.Join(dir, "munged.pid"), "--log-file="+filepath.Join(dir, "munged.log"), "--seed-file="+filepath.Join(dir, "munged.seed"))
	require.Eventually(t, func() bool { _, err := os.Stat(sock); return err == nil }, 10*time.Second, 50*time.Millisecond, "munged did not start")

	devs := filepath.Join(dir, "dev")
	require.NoError(t, os.MkdirAll(devs, 0o755))
	for i := 0; i < 8; i++ { // GPU device files for gres.conf: Slurm binds each step's GPUs to them
		require.NoError(t, syscall.Mknod(filepath.Join(devs, fmt.Sprintf("nvidia%d", i)), syscall.S_IFCHR|0o666, 1<<8|3))
	}
	ctlPort := FreePort(t)
	var nodes, gres strings.Builder
	for _, h := range c.hosts {
		fmt.Fprintf(&nodes, "NodeName=%s NodeAddr=%s CPUs=2 RealMemory=1000 Gres=gpu:8 State=UNKNOWN\n", h, c.Net.IP(h))
		fmt.Fprintf(&gres, "NodeName=%s Name=gpu File=%s/nvidia[0-7]\n", h, devs)
	}
	if len(partitions) == 0 {
		// gpu: where shoal's jobs run; urgent: a higher tier whose jobs
		// preempt them (cancelled after a 5 s grace, as sites configure it).
		partitions = []string{
			fmt.Sprintf("PartitionName=gpu Nodes=n[1-%d] Default=YES MaxTime=30 State=UP OverSubscribe=YES PriorityTier=1 PreemptMode=CANCEL GraceTime=5", hosts),
			fmt.Sprintf("PartitionName=urgent Nodes=n[1-%d] MaxTime=30 State=UP OverSubscribe=YES PriorityTier=2 PreemptMode=OFF", hosts)}
	}
	conf := fmt.Sprintf(`ClusterName=shoaltest
SlurmctldHost=ctl(%s)
SlurmctldPort=%d
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=%s
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=%s/ctld
SlurmdSpoolDir=%s/spool-%%n
SlurmctldPidFile=%s/ctld.pid
SlurmdPidFile=%s/slurmd-%%n.pid
SlurmctldLogFile=%s/slurmctld.log
SlurmdLogFile=%s/slurmd-%%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
EnforcePartLimits=ALL
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
%sJobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=5
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MinJobAge=30
%s%s
`, c.Net.Root(), ctlPort, sock, dir, dir, dir, dir, dir, dir, c.accounting(accounting, sock), nodes.String(), strings.Join(partitions, "\n"))
	c.conf = filepath.Join(dir, "slurm.conf")
	require.NoError(t, os.WriteFile(c.conf, []byte(conf), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "gres.conf"), []byte(gres.String()), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup.conf"), []byte("CgroupPlugin=cgroup/v1\n"), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "ctld"), 0o755))
	if accounting {
		c.startDBD()
	}
	c.StartCtld()
	if accounting {
		for _, a := range [][]string{{"add", "account", "proj1,proj2"}, {"add", "user", "root", "account=proj1"}} {
			require.Eventually(t, func() bool { _, err := c.Cmd("sacctmgr", append([]string{"-i"}, a...)...); return err == nil }, 30*time.Second, 200*time.Millisecond,
				"sacctmgr %v: %s", a, c.Logs())
		}
	}
	for _, h := range c.hosts {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, "spool-"+h), 0o755))
		c.Spawn("slurmd-"+h, append(c.Net.Wrap(h), "unshare", "--uts", "sh", "-c", "hostname "+h+" && exec slurmd -D -f "+c.conf),
			"")
	}
	require.Eventually(t, func() bool {
		out, err := c.Cmd("sinfo", "--noheader", "--format=%T %D")
		return err == nil && strings.TrimSpace(out) == fmt.Sprintf("idle %d", hosts)
	}, 60*time.Second, 250*time.Millisecond, "Slurm's nodes did not come up idle: %s", c.Logs())
	return c
}

// accounting is slurm.conf's accounting lines, and with it on, writes
// slurmdbd.conf beside slurm.conf.
func (c *Cluster) accounting(on bool, sock string) string {
	if !on {
		return "AccountingStorageType=accounting_storage/none\n"
	}
	c.dbPort, c.dbdPort = FreePort(c.t), FreePort(c.t)
	conf := fmt.Sprintf(`AuthType=auth/munge
AuthInfo=socket=%s
DbdHost=ctl
DbdAddr=%s
DbdPort=%d
SlurmUser=root
PidFile=%s/slurmdbd.pid
LogFile=%s/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=%d
StorageUser=root
StorageLoc=slurm_acct_db
`, sock, c.Net.Root(), c.dbdPort, c.Dir, c.Dir, c.dbPort)
	require.NoError(c.t, os.WriteFile(filepath.Join(c.Dir, "slurmdbd.conf"), []byte(conf), 0o600))
	// AccountingStoragePass names the munge socket for connections to slurmdbd.
	return fmt.Sprintf("AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=%s\nAccountingStoragePort=%d\nAccountingStoragePass=%s\nAccountingStorageEnforce=associations,limits,qos\n",
		c.Net.Root(), c.dbdPort, sock)
}

// startDBD starts MariaDB (a data directory of the test's, no grant
// tables) and slurmdbd, and registers the cluster.
func (c *Cluster) startDBD() {
	db := filepath.Join(c.Dir, "db")
	out, err := exec.Command("mysql_install_db", "--no-defaults", "--user=root", "--datadir="+db, "--skip-test-db").CombinedOutput()
	require.NoError(c.t, err, "%s", out)
	c.Spawn("mariadbd", nil, "mariadbd", "--no-defaults", "--user=root", "--datadir="+db, "--socket="+filepath.Join(c.Dir, "mysql.sock"),
		"--port="+strconv.Itoa(c.dbPort), "--bind-address=127.0.0.1", "--skip-grant-tables", "--pid-file="+filepath.Join(c.Dir, "mariadb.pid"))
	listening := func(addr string) bool {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}
	require.Eventually(c.t, func() bool { return listening(fmt.Sprintf("127.0.0.1:%d", c.dbPort)) }, 60*time.Second, 100*time.Millisecond, "MariaDB did not start")
	c.Spawn("slurmdbd", []string{"unshare", "--uts", "sh", "-c", "hostname ctl && exec slurmdbd -D"}, "")
	require.Eventually(c.t, func() bool { return listening(fmt.Sprintf("%s:%d", c.Net.Root(), c.dbdPort)) }, 60*time.Second, 100*time.Millisecond,
		"slurmdbd did not start: %s", c.Logs())
	out2, err := c.Cmd("sacctmgr", "-i", "add", "cluster", "shoaltest")
	require.NoError(c.t, err, "%s", out2)
}

// StartCtld (re)starts slurmctld, in a UTS namespace named ctl.
func (c *Cluster) StartCtld() {
	c.ctld = c.Spawn("slurmctld", []string{"unshare", "--uts", "sh", "-c", "hostname ctl && exec slurmctld -D -i -f " + c.conf}, "")
}

// StopCtld stops slurmctld (slurmctld down: the queue cannot be read).
func (c *Cluster) StopCtld() {
	_ = c.ctld.Process.Signal(syscall.SIGTERM)
	_, _ = c.ctld.Process.Wait()
}

// FreePort is a TCP port free on loopback now.
func FreePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Spawn starts a daemon (argv, or name with args) whose output goes to
// dir/name.out.
func (c *Cluster) Spawn(name string, argv []string, bin string, args ...string) *exec.Cmd {
	if argv == nil {
		argv = append([]string{bin}, args...)
	}
	out, err := os.Create(filepath.Join(c.Dir, name+".out"))
	require.NoError(c.t, err)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), c.Env()...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(c.t, cmd.Start(), name)
	c.procs = append(c.procs, cmd)
	return cmd
}

// Env points Slurm's commands at this cluster.
func (c *Cluster) Env() []string { return []string{"SLURM_CONF=" + c.conf} }

// Cmd runs a Slurm client command against the cluster.
func (c *Cluster) Cmd(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), c.Env()...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Logs are the daemons' last lines.
func (c *Cluster) Logs() string {
	var b strings.Builder
	for _, f := range []string{"slurmctld.log", "slurmd-n1.log", "slurmctld.out", "slurmd-n1.out", "munged.out", "slurmdbd.log", "slurmdbd.out", "mariadbd.out"} {
		data, _ := os.ReadFile(filepath.Join(c.Dir, f))
		lines := strings.Split(string(data), "\n")
		fmt.Fprintf(&b, "---- %s\n%s\n", f, strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	return b.String()
}

func (c *Cluster) stop() {
	if c.t.Failed() {
		c.t.Log(c.Logs())
	}
	// Jobs first (their steps run agents and engines in the hosts).
	_, _ = c.Cmd("scancel", "--full", "--user=root")
	for i := len(c.procs) - 1; i >= 0; i-- {
		p := c.procs[i]
		if p.Process != nil {
			_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
			_, _ = p.Process.Wait()
		}
	}
	if c.Net != nil {
		c.Net.Close()
	}
	if !c.t.Failed() {
		_ = os.RemoveAll(c.Dir)
	}
}

// Shoal is a coordinator with --slurm on the test's own address, whose
// jobs' nodes start agents (on the simulator) that join it.
type Shoal struct {
	t      testing.TB
	c      *Cluster
	Dir    string
	api    string
	Router string
	Gossip string
	coord  *exec.Cmd
	once   sync.Once
	hc     *http.Client
}

// StartShoal starts the coordinator; engines load in 1 s.
func StartShoal(t testing.TB, c *Cluster) *Shoal { return StartShoalWith(t, c, 1) }

// StartShoalWith is StartShoal with engines that take loadSeconds to load
// their weights.
func StartShoalWith(t testing.TB, c *Cluster, loadSeconds int) *Shoal {
	dir := filepath.Join(c.Dir, "shoal")
	bin := filepath.Join(dir, "bin")
	require.NoError(t, os.MkdirAll(bin, 0o755))
	for _, n := range []string{"ray", "vllm", "python3"} {
		require.NoError(t, os.Symlink(filepath.Join(c.bins, "shoal-sim"), filepath.Join(bin, n)))
	}
	root := c.Net.Root()
	e := &Shoal{t: t, c: c, Dir: dir, api: fmt.Sprintf("%s:%d", root, FreePort(t)), Router: fmt.Sprintf("%s:%d", root, FreePort(t))}
	gp := FreePort(t)
	e.Gossip = fmt.Sprintf("%s:%d", root, gp)
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "tmp"), 0o755))
	// TMPDIR: the agents' state directories are the test's (job ids start
	// at 1 in every test cluster).
	agent := strings.Join([]string{"env", "TMPDIR=" + filepath.Join(dir, "tmp"), filepath.Join(c.bins, "shoal"), "agent", "--slurm", "--join", fmt.Sprintf("%s:%d", root, gp), "--insecure",
		"--gpu-backend", "mock:h200x8", "--ray-bin", filepath.Join(bin, "ray"), "--vllm-bin", filepath.Join(bin, "vllm"),
		"--python-bin", filepath.Join(bin, "python3"), "--gossip-profile", "local", "--stop-grace", "2s", "--restart-backoff", "500ms",
		"--canary-interval", "3s", "--skip-local-model-check", "--engine-env", "SHOAL_SIM_STATE_DIR=" + filepath.Join(dir, "sim"),
		"--engine-env", "SHOAL_SIM_LOAD_SECONDS=" + strconv.Itoa(loadSeconds)}, " ")
	e.coord = c.Spawn("coordinator", []string{filepath.Join(c.bins, "shoal"), "coordinator", "--address", root, "--gossip-port", strconv.Itoa(gp),
		"--api", e.api, "--router", e.Router, "--data-dir", filepath.Join(dir, "coordinator"), "--gossip-profile", "local", "--metrics-addr=",
		"--no-api-keys", "--insecure", "--slurm", "--slurm-interval", "1s", "--slurm-agent-command", agent}, "")
	require.Eventually(t, func() bool { _, err := e.Run("get", "nodes"); return err == nil }, 20*time.Second, 100*time.Millisecond)
	t.Cleanup(e.Close)
	return e
}

// Run runs the shoal CLI against the coordinator.
func (e *Shoal) Run(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(e.c.bins, "shoal"), args...)
	cmd.Env = append(os.Environ(), "SHOAL_INSECURE=1", "SHOAL_COORDINATOR="+e.api)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Spec is a Slurm-sourced deployment of one node × 4 GPUs per replica;
// slurm is added inside its slurm block (", account: proj1").
func (e *Shoal) Spec(name string, replicas int, slurm string) string {
	return fmt.Sprintf(`apiVersion: shoal/v1
kind: Deployment
name: %s
model: {source: /models/%s}
engine: {kind: ray-vllm, tensorParallelSize: 4, startupTimeoutSeconds: 60}
resources: {nodes: 1, gpusPerNode: 4, gpuModel: H200}
replicas: {count: %d}
slurm: {partition: gpu, timeLimitMinutes: 10, handoverLeadSeconds: 60, options: ["--output=%s/job-%%j.out"]%s}
`, name, name, replicas, e.Dir, slurm)
}

// Apply applies spec (file name.yaml) through the CLI.
func (e *Shoal) Apply(name, spec string) (string, error) {
	f := filepath.Join(e.Dir, name+".yaml")
	require.NoError(e.t, os.WriteFile(f, []byte(spec), 0o644))
	return e.Run("apply", "-f", f)
}

// Replica is a row of `shoal get replicas -o json`.
type Replica struct {
	GroupID          string   `json:"groupId"`
	Deployment       string   `json:"deployment"`
	State            string   `json:"state"`
	Members          []string `json:"members"`
	SlurmJob         string   `json:"slurmJob"`
	SlurmReason      string   `json:"slurmReason"`
	SlurmWaitSeconds string   `json:"slurmWaitSeconds"`
}

// Replicas lists the replicas (and the jobs no replica runs on yet).
func (e *Shoal) Replicas() []Replica {
	out, err := e.Run("get", "replicas", "-o", "json")
	if err != nil {
		return nil
	}
	var r struct {
		Replicas []Replica `json:"replicas"`
	}
	if json.Unmarshal([]byte(out), &r) != nil {
		return nil
	}
	return r.Replicas
}

// Ready counts the ready replicas and names their jobs.
func Ready(rs []Replica) (n int, jobs []string) {
	for _, r := range rs {
		if r.State == "ready" && r.GroupID != "" {
			n++
			jobs = append(jobs, r.SlurmJob)
		}
	}
	return n, jobs
}

// Jobs are the cluster's live jobs named shoal.….
func (c *Cluster) Jobs() []string {
	out, err := c.Cmd("squeue", "--noheader", "--format=%i %j %T")
	if err != nil {
		return nil
	}
	var ids []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && strings.HasPrefix(f[1], "shoal.") && f[2] != "COMPLETING" {
			ids = append(ids, f[0])
		}
	}
	return ids
}

// WaitReady waits until n replicas are ready and returns their jobs.
func (e *Shoal) WaitReady(n int, within time.Duration) []string {
	e.t.Helper()
	var jobs []string
	require.Eventually(e.t, func() bool {
		var got int
		got, jobs = Ready(e.Replicas())
		return got == n
	}, within, 250*time.Millisecond, "want %d ready replica(s): %v\n%s", n, e.Replicas(), e.Describe("m"))
	return jobs
}

// Describe is `shoal describe deployment name`.
func (e *Shoal) Describe(name string) string {
	out, _ := e.Run("describe", "deployment", name)
	return out
}

func (e *Shoal) client() openai.Client {
	return openai.NewClient(option.WithBaseURL("http://"+e.Router+"/v1"), option.WithAPIKey("x"), option.WithMaxRetries(0), option.WithHTTPClient(e.http()))
}

func (e *Shoal) http() *http.Client {
	e.once.Do(func() { e.hc = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}} })
	return e.hc
}

// Close closes the clients' idle connections.
func (e *Shoal) Close() {
	if e.hc != nil {
		e.hc.CloseIdleConnections()
	}
}

// Complete sends one completion to model through the router.
func (e *Shoal) Complete(model string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cl := e.client()
	r, err := cl.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(model),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("hello")}, MaxTokens: openai.Int(4)})
	if err == nil && len(r.Choices) == 0 {
		err = fmt.Errorf("no choices")
	}
	return err
}

// Load sends completions from workers until End; it counts failures.
type Load struct {
	ok, failed atomic.Int64
	errs       sync.Map
	stop       chan struct{}
	wg         sync.WaitGroup
}

// StartLoad starts workers sending completions to model.
func (e *Shoal) StartLoad(model string, workers int) *Load {
	return StartLoad(workers, func() error { return e.Complete(model) })
}

// StartLoad starts workers calling req in a loop until End.
func StartLoad(workers int, req func() error) *Load {
	l := &Load{stop: make(chan struct{})}
	for i := 0; i < workers; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				if err := req(); err != nil {
					l.failed.Add(1)
					l.errs.Store(err.Error(), true)
				} else {
					l.ok.Add(1)
				}
			}
		}()
	}
	return l
}

// End stops the workers and reports what they saw.
func (l *Load) End() (ok, failed int64, errs []string) {
	close(l.stop)
	l.wg.Wait()
	l.errs.Range(func(k, _ any) bool { errs = append(errs, k.(string)); return len(errs) < 5 })
	return l.ok.Load(), l.failed.Load(), errs
}
