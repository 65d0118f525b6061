// Package slurm runs shoal on a real Slurm cluster: Debian's slurmctld and
// one slurmd per network-namespace host (each with its own hostname in a
// UTS namespace, its own spool directory, proctrack/linuxproc, GPUs as GRES
// with device files), munge for authentication, and the coordinator
// submitting, watching and cancelling jobs through sbatch, squeue and
// scancel. With SHOAL_REQUIRE_SLURM=1 (CI) a missing Slurm fails the suite.
package slurm

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/testbin"
	"github.com/shoalhq/shoal/test/chaos"
	"github.com/stretchr/testify/require"
)

var binDir string

func TestMain(m *testing.M) { testbin.Main(m, &binDir) }

// subnet is this suite's network (the chaos suite has 10.213.77.).
const subnet = "10.213.78."

// need skips (or, in CI, fails) when this machine cannot run Slurm.
func need(t *testing.T) {
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

// cluster is a real Slurm cluster of hosts n1…nN with 8 GPUs each.
type cluster struct {
	t     *testing.T
	dir   string
	net   *chaos.Net
	hosts []string
	conf  string
	procs []*exec.Cmd
	ctld  *exec.Cmd
}

// startSlurm brings up munged, slurmctld and one slurmd per host, and waits
// until every node is idle.
func startSlurm(t *testing.T, hosts int, partitions ...string) *cluster {
	need(t)
	dir, err := os.MkdirTemp("", "shoal-slurm-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	c := &cluster{t: t, dir: dir}
	names := map[string]int{}
	for i := 1; i <= hosts; i++ {
		h := "n" + strconv.Itoa(i)
		c.hosts = append(c.hosts, h)
		names[h] = i
	}
	c.net, err = chaos.NewNetOn(subnet, names)
	require.NoError(t, err)
	t.Cleanup(c.stop)

	key := make([]byte, 1024)
	_, _ = rand.Read(key)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "munge.key"), key, 0o600))
	sock := filepath.Join(dir, "munge.sock")
	c.spawn("munged", nil, "munged", "-F", "--force", "--socket="+sock, "--key-file="+filepath.Join(dir, "munge.key"),
		"--pid-file="+filepath.Join(dir, "munged.pid"), "--log-file="+filepath.Join(dir, "munged.log"), "--seed-file="+filepath.Join(dir, "munged.seed"))
	require.Eventually(t, func() bool { _, err := os.Stat(sock); return err == nil }, 10*time.Second, 50*time.Millisecond, "munged did not start")

	devs := filepath.Join(dir, "dev")
	require.NoError(t, os.MkdirAll(devs, 0o755))
	for i := 0; i < 8; i++ { // GPU device files for gres.conf: Slurm binds each step's GPUs to them
		require.NoError(t, syscall.Mknod(filepath.Join(devs, fmt.Sprintf("nvidia%d", i)), syscall.S_IFCHR|0o666, 1<<8|3))
	}
	ctlPort := freePort(t)
	var nodes, gres strings.Builder
	for _, h := range c.hosts {
		fmt.Fprintf(&nodes, "NodeName=%s NodeAddr=%s CPUs=2 RealMemory=1000 Gres=gpu:8 State=UNKNOWN\n", h, c.net.IP(h))
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
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
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
`, c.net.Root(), ctlPort, sock, dir, dir, dir, dir, dir, dir, nodes.String(), strings.Join(partitions, "\n"))
	c.conf = filepath.Join(dir, "slurm.conf")
	require.NoError(t, os.WriteFile(c.conf, []byte(conf), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "gres.conf"), []byte(gres.String()), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup.conf"), []byte("CgroupPlugin=cgroup/v1\n"), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "ctld"), 0o755))
	c.startCtld()
	for _, h := range c.hosts {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, "spool-"+h), 0o755))
		c.spawn("slurmd-"+h, append(c.net.Wrap(h), "unshare", "--uts", "sh", "-c", "hostname "+h+" && exec slurmd -D -f "+c.conf),
			"")
	}
	require.Eventually(t, func() bool {
		out, err := c.cmd("sinfo", "--noheader", "--format=%T %D")
		return err == nil && strings.TrimSpace(out) == fmt.Sprintf("idle %d", hosts)
	}, 60*time.Second, 250*time.Millisecond, "Slurm's nodes did not come up idle: %s", c.logs())
	return c
}

// startCtld (re)starts slurmctld, in a UTS namespace named ctl.
func (c *cluster) startCtld() {
	c.ctld = c.spawn("slurmctld", []string{"unshare", "--uts", "sh", "-c", "hostname ctl && exec slurmctld -D -i -f " + c.conf}, "")
}

// stopCtld stops slurmctld (slurmctld down: the queue cannot be read).
func (c *cluster) stopCtld() {
	_ = c.ctld.Process.Signal(syscall.SIGTERM)
	_, _ = c.ctld.Process.Wait()
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// spawn starts a daemon (argv, or name with args) whose output goes to
// dir/name.out.
func (c *cluster) spawn(name string, argv []string, bin string, args ...string) *exec.Cmd {
	if argv == nil {
		argv = append([]string{bin}, args...)
	}
	out, err := os.Create(filepath.Join(c.dir, name+".out"))
	require.NoError(c.t, err)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), c.env()...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(c.t, cmd.Start(), name)
	c.procs = append(c.procs, cmd)
	return cmd
}

func (c *cluster) env() []string { return []string{"SLURM_CONF=" + c.conf} }

// cmd runs a Slurm client command against the cluster.
func (c *cluster) cmd(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), c.env()...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *cluster) logs() string {
	var b strings.Builder
	for _, f := range []string{"slurmctld.log", "slurmd-n1.log", "slurmctld.out", "slurmd-n1.out", "munged.out"} {
		data, _ := os.ReadFile(filepath.Join(c.dir, f))
		lines := strings.Split(string(data), "\n")
		fmt.Fprintf(&b, "---- %s\n%s\n", f, strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	return b.String()
}

func (c *cluster) stop() {
	if c.t.Failed() {
		c.t.Log(c.logs())
	}
	// Jobs first (their steps run agents and engines in the hosts).
	_, _ = c.cmd("scancel", "--full", "--user=root")
	for i := len(c.procs) - 1; i >= 0; i-- {
		p := c.procs[i]
		if p.Process != nil {
			_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
			_, _ = p.Process.Wait()
		}
	}
	if c.net != nil {
		c.net.Close()
	}
	if !c.t.Failed() {
		_ = os.RemoveAll(c.dir)
	}
}

func TestSlurmClusterRunsAJob(t *testing.T) {
	c := startSlurm(t, 2)
	out, err := c.cmd("srun", "--nodes=2", "--gres=gpu:4", "--ntasks-per-node=1", "--time=1", "sh", "-c", `echo "$(hostname) $SLURM_STEP_GPUS"`)
	require.NoError(t, err, out)
	require.Contains(t, out, "n1 0,1,2,3")
	require.Contains(t, out, "n2 0,1,2,3")
}
