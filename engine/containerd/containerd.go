package containerd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	ctd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cdi"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/shoalhq/shoal/engine"
)

// Labels the runtime puts on every container it creates.
const (
	LabelNode   = "io.shoal.node"
	LabelEngine = "io.shoal.engine"
	LabelLog    = "io.shoal.log"
	// LabelOwner is the agent's state directory: two agents (or dev
	// clusters) with the same node id never sweep each other's containers.
	LabelOwner = "io.shoal.owner"
)

// DefaultAddress is where Debian's (and upstream's) containerd listens.
const DefaultAddress = "/run/containerd/containerd.sock"

// Config says which daemon to use and what the host offers containers.
type Config struct {
	// Address is containerd's socket (default /run/containerd/containerd.sock).
	Address string
	// Namespace is the containerd namespace shoal's containers live in (default shoal).
	Namespace string
	// Snapshotter unpacks images (default: containerd's, overlayfs on Linux).
	Snapshotter string
	// LogDir receives one NAME.log per container, written by the shim.
	LogDir string
	// NodeID labels the containers, so this node's agent finds its own.
	NodeID string
	// Owner (the agent's state directory) labels them too; Sweep only
	// touches containers of the same owner.
	Owner string
	// GPUs are the host GPU indices this agent owns (nil: all).
	GPUs []int
	// DevRoot is where device nodes are looked up (default /dev; tests).
	DevRoot string
	// CDIDirs hold CDI specs (default /etc/cdi and /var/run/cdi).
	CDIDirs []string
	// Log hears what the runtime does on its own (the cleanup after an
	// engine's exit); nil: slog's default logger.
	Log *slog.Logger
	// LogBinary is the engine-log writer the shim runs for each container
	// (RunLogger, started as `LogBinary --shoal-engine-log FILE`); default:
	// this process's own executable, the shoal binary.
	LogBinary string
}

// Runtime runs engine commands as containerd containers: host network, GPUs
// through CDI (else the /dev/nvidia* nodes), /dev/infiniband, IPC_LOCK, a
// sized /dev/shm, read-only model mounts, unlimited memlock, logs to files.
// Tasks are owned by containerd's shim, so they outlive the agent and are
// adopted again from the container id the agent persisted.
type Runtime struct {
	cfg    Config
	client *ctd.Client
}

var _ engine.Runtime = (*Runtime)(nil)

// New connects to the daemon. The client speaks containerd's v1 API services,
// which 1.6, 1.7 and 2.x daemons all serve.
func New(ctx context.Context, cfg Config) (*Runtime, error) {
	if cfg.Address == "" {
		cfg.Address = DefaultAddress
	}
	if cfg.Namespace == "" {
		cfg.Namespace = "shoal"
	}
	if cfg.DevRoot == "" {
		cfg.DevRoot = "/dev"
	}
	if cfg.CDIDirs == nil {
		cfg.CDIDirs = []string{"/etc/cdi", "/var/run/cdi"}
	}
	if cfg.LogBinary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("engine log writer: %w", err)
		}
		cfg.LogBinary = exe
	}
	if _, err := os.Stat(cfg.Address); err != nil {
		return nil, fmt.Errorf("containerd socket %s: %w (is containerd installed and running? `systemctl status containerd`)", cfg.Address, err)
	}
	c, err := ctd.New(cfg.Address, ctd.WithDefaultNamespace(cfg.Namespace), ctd.WithTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", cfg.Address, err)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Version(vctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("containerd at %s does not answer: %w", cfg.Address, err)
	}
	return &Runtime{cfg: cfg, client: c}, nil
}

func (r *Runtime) log(msg, id string, err error) {
	l := r.cfg.Log
	if l == nil {
		l = slog.Default()
	}
	l.Warn(msg, "container", id, "err", err)
}

// Close releases the client connection; running containers are unaffected.
func (r *Runtime) Close() error { return r.client.Close() }

// Kind is "containerd".
func (r *Runtime) Kind() string { return "containerd" }

// Client exposes the daemon connection (tests import images through it).
func (r *Runtime) Client() *ctd.Client { return r.client }

func (r *Runtime) ctx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, r.cfg.Namespace)
}

var idUnsafe = regexp.MustCompile(`[^A-Za-z0-9]+`)

// containerID is shoal-NAME-RANDOM, within containerd's identifier rules.
func containerID(name string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	n := strings.Trim(idUnsafe.ReplaceAllString(name, "-"), "-")
	if len(n) > 40 {
		n = n[:40]
	}
	if n == "" {
		n = "engine"
	}
	return "shoal-" + n + "-" + hex.EncodeToString(b)
}

// image returns the image, pulling it when the daemon lacks it, unpacked for
// the snapshotter.
func (r *Runtime) image(ctx context.Context, ref string) (ctd.Image, error) {
	img, err := r.client.GetImage(ctx, ref)
	if errdefs.IsNotFound(err) {
		img, err = r.client.Pull(ctx, ref, ctd.WithPullUnpack, ctd.WithPullSnapshotter(r.cfg.Snapshotter))
		if err != nil {
			return nil, fmt.Errorf("image %s is not in containerd namespace %q and could not be pulled: %w (import it with `ctr -n %s images import FILE`)",
				ref, r.cfg.Namespace, err, r.cfg.Namespace)
		}
		return img, nil
	}
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	ok, err := img.IsUnpacked(ctx, r.cfg.Snapshotter)
	if err == nil && !ok {
		err = img.Unpack(ctx, r.cfg.Snapshotter)
	}
	if err != nil {
		return nil, fmt.Errorf("unpack image %s: %w", ref, err)
	}
	return img, nil
}

// Start creates a container for c and starts its task.
func (r *Runtime) Start(ctx context.Context, c engine.Command) (engine.Handle, error) {
	ctx = r.ctx(ctx)
	if c.Container.Image == "" {
		return nil, fmt.Errorf("start %s: engine.image is required with runtime containerd", c.Name)
	}
	if err := os.MkdirAll(r.cfg.LogDir, 0o755); err != nil {
		return nil, fmt.Errorf("log dir: %w", err)
	}
	img, err := r.image(ctx, c.Container.Image)
	if err != nil {
		return nil, err
	}
	logPath, err := filepath.Abs(filepath.Join(r.cfg.LogDir, c.LogName()+".log"))
	if err != nil {
		return nil, err
	}
	if lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
		fmt.Fprintf(lf, "==> %s shoal: starting %s in image %s\n", time.Now().UTC().Format(time.RFC3339), c.String(), c.Container.Image)
		lf.Close()
	}
	opts, env, err := r.specOpts(img, c)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", c.Name, err)
	}
	labels := map[string]string{LabelNode: r.cfg.NodeID, LabelEngine: c.Name, LabelLog: logPath, LabelOwner: r.cfg.Owner}
	for k, v := range c.Container.Labels {
		labels[k] = v
	}
	id := containerID(c.LogName())
	ctr, err := r.client.NewContainer(ctx, id,
		ctd.WithImage(img),
		ctd.WithSnapshotter(r.cfg.Snapshotter),
		ctd.WithNewSnapshot(id, img),
		ctd.WithNewSpec(append(opts, oci.WithEnv(env))...),
		ctd.WithContainerLabels(labels))
	if err != nil {
		return nil, fmt.Errorf("create container for %s: %w", c.Name, err)
	}
	task, err := ctr.NewTask(ctx, cio.BinaryIO(r.cfg.LogBinary, map[string]string{LoggerFlag: logPath}))
	if err != nil {
		_ = ctr.Delete(ctx, ctd.WithSnapshotCleanup)
		return nil, fmt.Errorf("create task for %s: %w", c.Name, err)
	}
	h, err := r.watch(ctr, task, c.Name, logPath)
	if err != nil {
		_, _ = task.Delete(ctx)
		_ = ctr.Delete(ctx, ctd.WithSnapshotCleanup)
		return nil, err
	}
	if err := task.Start(ctx); err != nil {
		h.mu.Lock()
		h.deleted = true // deleted here; the exit watcher leaves it alone
		h.mu.Unlock()
		close(h.started)
		_, _ = task.Delete(ctx, ctd.WithProcessKill)
		_ = ctr.Delete(ctx, ctd.WithSnapshotCleanup)
		return nil, fmt.Errorf("start %s (%s in %s): %w", c.Name, c.Path, c.Container.Image, err)
	}
	h.pid = int(task.Pid())
	close(h.started)
	return h, nil
}

// specOpts is the OCI spec of an engine container, and its environment.
func (r *Runtime) specOpts(img ctd.Image, c engine.Command) ([]oci.SpecOpts, []string, error) {
	env := append([]string(nil), c.Env...)
	host, _ := os.Hostname()
	opts := []oci.SpecOpts{
		oci.WithImageConfig(img),
		oci.WithProcessArgs(append([]string{c.Path}, c.Args...)...),
		oci.WithHostNamespace(specs.NetworkNamespace),
		oci.WithHostHostsFile,
		oci.WithHostResolvconf,
		oci.WithHostname(host),
		oci.WithAddedCapabilities([]string{"CAP_IPC_LOCK", "CAP_SYS_NICE"}),
		oci.WithRlimit(&specs.POSIXRlimit{Type: "RLIMIT_MEMLOCK", Hard: memlock(), Soft: memlock()}),
		oci.WithRlimit(&specs.POSIXRlimit{Type: "RLIMIT_NOFILE", Hard: nofile(), Soft: nofile()}),
		oci.WithDevShmSize(shmKiB(c.Container.ShmBytes)),
	}
	var mounts []specs.Mount
	for _, m := range c.Container.Mounts {
		o := []string{"rbind", "rw"}
		if m.ReadOnly {
			o[1] = "ro"
		}
		target := m.Target
		if target == "" {
			target = m.Source
		}
		mounts = append(mounts, specs.Mount{Type: "bind", Source: m.Source, Destination: target, Options: o})
	}
	if len(mounts) > 0 {
		opts = append(opts, oci.WithMounts(mounts))
	}
	gpuOpts, cdiUsed := r.gpuOpts()
	opts = append(opts, gpuOpts...)
	if cdiUsed {
		// CDI exposes exactly this agent's GPUs, numbered from 0 inside.
		env = dropEnv(env, "CUDA_VISIBLE_DEVICES")
	}
	opts = append(opts, r.deviceDirOpts("infiniband")...)
	return opts, env, nil
}

// nofile is the open-file limit engines get: the agent's own hard limit (the
// kernel refuses more than fs.nr_open), at most 1Mi.
func nofile() uint64 {
	var l unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &l) != nil || l.Max == 0 {
		return 65536
	}
	return min(l.Max, 1<<20)
}

// memlock is the locked-memory limit engines get: unlimited where the agent's
// hard limit is (the systemd unit sets LimitMEMLOCK=infinity, and RDMA needs
// it), else that hard limit, since raising it would be refused.
func memlock() uint64 {
	var l unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_MEMLOCK, &l) != nil {
		return math.MaxUint64
	}
	return l.Max
}

func dropEnv(env []string, key string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, key+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// shmKiB is the /dev/shm size: asked, else half of the host's memory.
func shmKiB(b int64) int64 {
	if b > 0 {
		return max(b>>10, 1)
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil && si.Totalram > 0 {
		return int64(uint64(si.Totalram)*uint64(si.Unit)/2) >> 10
	}
	return 64 << 20 // 64 GiB
}

// HasCDIGPUs reports whether a CDI spec for nvidia.com/gpu is installed
// (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`).
func (r *Runtime) HasCDIGPUs() bool {
	for _, d := range r.cfg.CDIDirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(d, e.Name()))
			if err == nil && bytes.Contains(b, []byte("nvidia.com/gpu")) {
				return true
			}
		}
	}
	return false
}

// gpuOpts gives the container this agent's GPUs: through CDI when the host
// has a spec (driver libraries included), else the device nodes (the image
// must then carry user-space driver libraries matching the host's driver).
func (r *Runtime) gpuOpts() ([]oci.SpecOpts, bool) {
	if r.HasCDIGPUs() {
		devs := []string{"nvidia.com/gpu=all"}
		if r.cfg.GPUs != nil {
			devs = devs[:0]
			for _, i := range r.cfg.GPUs {
				devs = append(devs, fmt.Sprintf("nvidia.com/gpu=%d", i))
			}
		}
		return []oci.SpecOpts{cdi.WithCDIDevices(devs...)}, r.cfg.GPUs != nil
	}
	var opts []oci.SpecOpts
	ents, _ := os.ReadDir(r.cfg.DevRoot)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "nvidia") && isCharDev(filepath.Join(r.cfg.DevRoot, e.Name())) {
			opts = append(opts, oci.WithLinuxDevice(filepath.Join(r.cfg.DevRoot, e.Name()), "rwm"))
		}
	}
	return append(opts, r.deviceDirOpts("nvidia-caps")...), false
}

// deviceDirOpts adds every character device under DevRoot/dir.
func (r *Runtime) deviceDirOpts(dir string) []oci.SpecOpts {
	var opts []oci.SpecOpts
	ents, _ := os.ReadDir(filepath.Join(r.cfg.DevRoot, dir))
	for _, e := range ents {
		p := filepath.Join(r.cfg.DevRoot, dir, e.Name())
		if isCharDev(p) {
			opts = append(opts, oci.WithLinuxDevice(p, "rwm"))
		}
	}
	return opts
}

func isCharDev(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// Adopt loads the container an earlier agent created and watches its task.
func (r *Runtime) Adopt(ctx context.Context, rec engine.Record) (engine.Handle, error) {
	ctx = r.ctx(ctx)
	if rec.Container == "" {
		return nil, fmt.Errorf("adopt %s: no container id recorded", rec.Name)
	}
	ctr, err := r.client.LoadContainer(ctx, rec.Container)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("adopt %s (container %s): %w", rec.Name, rec.Container, engine.ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", rec.Name, err)
	}
	task, err := ctr.Task(ctx, nil)
	if errdefs.IsNotFound(err) {
		_ = ctr.Delete(ctx, ctd.WithSnapshotCleanup)
		return nil, fmt.Errorf("adopt %s (container %s has no task): %w", rec.Name, rec.Container, engine.ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", rec.Name, err)
	}
	if st, err := task.Status(ctx); err != nil || st.Status != ctd.Running {
		_, _ = task.Delete(ctx, ctd.WithProcessKill)
		_ = ctr.Delete(ctx, ctd.WithSnapshotCleanup)
		return nil, fmt.Errorf("adopt %s (container %s not running): %w", rec.Name, rec.Container, engine.ErrGone)
	}
	log := rec.Log
	if log == "" {
		log = filepath.Join(r.cfg.LogDir, rec.Name+".log")
	}
	h, err := r.watch(ctr, task, rec.Name, log)
	if err != nil {
		return nil, err
	}
	h.pid = int(task.Pid())
	close(h.started)
	return h, nil
}

// Sweep stops and deletes this node's containers that keep does not name:
// engines of a run the agent could not adopt must not hold GPUs.
func (r *Runtime) Sweep(ctx context.Context, keep []engine.Record) (int, error) {
	ctx = r.ctx(ctx)
	filter := fmt.Sprintf("labels.%q==%q", LabelNode, r.cfg.NodeID)
	if r.cfg.Owner != "" {
		filter += fmt.Sprintf(",labels.%q==%q", LabelOwner, r.cfg.Owner)
	}
	ctrs, err := r.client.Containers(ctx, filter)
	if err != nil {
		return 0, err
	}
	kept := map[string]bool{}
	for _, k := range keep {
		kept[k.Container] = true
	}
	n := 0
	for _, c := range ctrs {
		if kept[c.ID()] {
			continue
		}
		if task, err := c.Task(ctx, nil); err == nil {
			_ = task.Kill(ctx, syscall.SIGKILL, ctd.WithKillAll)
			_, _ = task.Delete(ctx, ctd.WithProcessKill)
		}
		if err := c.Delete(ctx, ctd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			return n, fmt.Errorf("delete container %s: %w", c.ID(), err)
		}
		n++
	}
	return n, nil
}

// Exec runs c inside h's container (same namespaces, the container's env plus c.Env).
func (r *Runtime) Exec(ctx context.Context, h engine.Handle, c engine.Command) ([]byte, error) {
	ch, ok := h.(*Handle)
	if !ok {
		return nil, fmt.Errorf("exec %s: not a containerd engine", c.Name)
	}
	ctx = r.ctx(ctx)
	s, err := ch.ctr.Spec(ctx)
	if err != nil {
		return nil, err
	}
	p := *s.Process
	p.Terminal = false
	p.Args = append([]string{c.Path}, c.Args...)
	p.Env = append(append([]string(nil), p.Env...), c.Env...)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	var out syncBuffer
	proc, err := ch.task.Exec(ctx, "exec-"+hex.EncodeToString(b), &p, cio.NewCreator(cio.WithStreams(nil, &out, &out)))
	if err != nil {
		return nil, fmt.Errorf("exec %s in %s: %w", c.Name, ch.ctr.ID(), err)
	}
	defer proc.Delete(context.WithoutCancel(ctx), ctd.WithProcessKill) //nolint:errcheck
	statusC, err := proc.Wait(ctx)
	if err != nil {
		return nil, err
	}
	if err := proc.Start(ctx); err != nil {
		return nil, fmt.Errorf("exec %s in %s: %w", c.Name, ch.ctr.ID(), err)
	}
	select {
	case st := <-statusC:
		proc.IO().Wait()
		if code := st.ExitCode(); code != 0 {
			return out.Bytes(), fmt.Errorf("%s: exit status %d", c.Name, code)
		}
		return out.Bytes(), nil
	case <-ctx.Done():
		_ = proc.Kill(context.WithoutCancel(ctx), syscall.SIGKILL)
		return out.Bytes(), ctx.Err()
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.b.Bytes()...)
}

// Handle is one engine container and its task.
type Handle struct {
	rt      *Runtime
	ctr     ctd.Container
	task    ctd.Task
	name    string
	logPath string
	pid     int
	cancel  context.CancelFunc
	// started is closed once Start (or Adopt) is done with the task: the
	// client's task is not safe to delete while Start still fills it in, and
	// an engine with bad arguments exits before Start returns.
	started chan struct{}
	*engine.Exit

	mu      sync.Mutex
	deleted bool // guarded by mu
}

// watch waits for the task's exit in the background.
func (r *Runtime) watch(ctr ctd.Container, task ctd.Task, name, logPath string) (*Handle, error) {
	wctx, cancel := context.WithCancel(r.ctx(context.Background()))
	statusC, err := task.Wait(wctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("wait %s: %w", name, err)
	}
	h := &Handle{rt: r, ctr: ctr, task: task, name: name, logPath: logPath, cancel: cancel, started: make(chan struct{}), Exit: engine.NewExit()}
	go func() {
		st := <-statusC
		<-h.started
		code, _, werr := st.Result()
		var err error
		switch {
		case werr != nil:
			// The watch ended (the client closed), not the task: it runs on.
			h.Finish(fmt.Errorf("wait: %w", werr))
			return
		case code > 128 && code < 128+65:
			err = &engine.ExitError{Code: int(code), Signal: unix.SignalName(syscall.Signal(code - 128))}
		case code != 0:
			err = &engine.ExitError{Code: int(code)}
		}
		// The exit is reported before the shim has copied the task's last
		// output to the log; deleting the task waits for that copy. The
		// container and its snapshot go too: nothing stays behind for a
		// task nobody will start again, whoever calls Stop (or not).
		if cerr := h.remove(); cerr != nil {
			h.rt.log("remove exited engine container", h.ctr.ID(), cerr)
		}
		h.Finish(err)
	}()
	return h, nil
}

// remove deletes the (stopped) task, the container and its snapshot, once.
func (h *Handle) remove() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.deleted {
		return nil
	}
	ctx, cancel := context.WithTimeout(h.rt.ctx(context.Background()), 15*time.Second)
	defer cancel()
	if _, err := h.task.Delete(ctx); err != nil && !errdefs.IsNotFound(err) { // the task has exited: nothing to kill
		return fmt.Errorf("delete task %s: %w", h.ctr.ID(), err)
	}
	if err := h.ctr.Delete(ctx, ctd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("delete container %s: %w", h.ctr.ID(), err)
	}
	h.deleted = true
	h.cancel()
	return nil
}

// Name is the engine command's name.
func (h *Handle) Name() string { return h.name }

// Pid is the task's host pid.
func (h *Handle) Pid() int { return h.pid }

// LogPath is the file the shim writes the task's output to.
func (h *Handle) LogPath() string { return h.logPath }

// Record names the container for adoption.
func (h *Handle) Record() engine.Record {
	return engine.Record{Name: h.name, Pid: h.pid, Runtime: "containerd", Container: h.ctr.ID(), Log: h.logPath}
}

// Stop: SIGTERM to every process of the task, grace, SIGKILL; the task and
// the container (with its snapshot) are deleted at the exit.
func (h *Handle) Stop(ctx context.Context, grace time.Duration) error {
	ctx = h.rt.ctx(context.WithoutCancel(ctx))
	select {
	case <-h.Done():
	default:
		_ = h.task.Kill(ctx, syscall.SIGTERM, ctd.WithKillAll)
		t := time.NewTimer(grace)
		select {
		case <-h.Done():
		case <-t.C:
		}
		t.Stop()
		select {
		case <-h.Done():
		default:
			_ = h.task.Kill(ctx, syscall.SIGKILL, ctd.WithKillAll)
			select {
			case <-h.Done():
			case <-time.After(10 * time.Second):
				return fmt.Errorf("stop %s (container %s): still running 10s after SIGKILL", h.name, h.ctr.ID())
			}
		}
	}
	return h.remove() // done already at the exit, unless that failed
}
