package containerd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"go.uber.org/goleak"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	ctd "github.com/containerd/containerd/v2/client"
	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/enginetest"
	"github.com/shoalhq/shoal/internal/ocitest"
)

const socket = "/run/containerd/containerd.sock"

// TestMain fails the package when its tests leave anything behind in their
// namespace — a task, a container, a shim process — or a goroutine.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == LoggerFlag { // the shim runs this binary as the engine-log writer
		os.Exit(RunLogger(os.Args[2]))
	}
	code := m.Run()
	if code == 0 {
		if err := leftovers("shoal-test"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	if code == 0 {
		// The CDI registry containerd's client opens watches its spec
		// directories for the whole process (a library global).
		if err := goleak.Find(goleak.IgnoreTopFunction("tags.cncf.io/container-device-interface/pkg/cdi.(*watch).watch"),
			goleak.IgnoreAnyFunction("github.com/fsnotify/fsnotify.(*inotify).readEvents")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// leftovers lists what remains in namespace ns (nothing without a daemon).
func leftovers(ns string) error {
	if _, err := os.Stat(socket); err != nil || os.Geteuid() != 0 {
		return nil
	}
	c, err := ctd.New(socket, ctd.WithDefaultNamespace(ns))
	if err != nil {
		return err
	}
	defer c.Close()
	ctx := namespaces.WithNamespace(context.Background(), ns)
	var left []string
	// A shim exits shortly after its last task is deleted.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		left = left[:0]
		ctrs, err := c.Containers(ctx)
		if err != nil {
			return err
		}
		for _, x := range ctrs {
			left = append(left, "container "+x.ID())
		}
		out, _ := exec.Command("pgrep", "-f", "containerd-shim-runc-v2 -namespace "+ns+" ").Output()
		for _, pid := range strings.Fields(string(out)) {
			left = append(left, "shim pid "+pid)
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("the tests left behind in containerd namespace %s: %s", ns, strings.Join(left, ", "))
	}
	return nil
}

// daemon skips the test when no containerd runs here, unless CI asked for it
// (SHOAL_REQUIRE_CONTAINERD=1, set by .ci/run, which starts the daemon).
func daemon(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(socket); err != nil || os.Geteuid() != 0 {
		if os.Getenv("SHOAL_REQUIRE_CONTAINERD") == "1" {
			t.Fatalf("SHOAL_REQUIRE_CONTAINERD=1 but no containerd at %s (or not root): %v", socket, err)
		}
		t.Skip("no containerd daemon (root) here; CI starts one")
	}
}

// ImportSim builds the simulator image and imports it into the runtime's namespace.
func importSim(t *testing.T, rt *Runtime) {
	t.Helper()
	tarball, err := ocitest.SimImage(t.TempDir())
	require.NoError(t, err)
	f, err := os.Open(tarball)
	require.NoError(t, err)
	defer f.Close()
	imgs, err := rt.client.Import(rt.ctx(context.Background()), f, ctd.WithAllPlatforms(true))
	require.NoError(t, err)
	require.NotEmpty(t, imgs)
}

func TestConformance(t *testing.T) {
	daemon(t)
	dir := t.TempDir()
	cfg := Config{Address: socket, Namespace: "shoal-test", LogDir: filepath.Join(dir, "logs"), NodeID: "conformance", Owner: dir, DevRoot: t.TempDir()}
	rt, err := New(context.Background(), cfg)
	require.NoError(t, err)
	defer rt.Close()
	importSim(t, rt)
	enginetest.Run(t, enginetest.Setup{
		Runtime: rt,
		Reopen: func(t *testing.T) engine.Runtime {
			r2, err := New(context.Background(), cfg)
			require.NoError(t, err)
			t.Cleanup(func() { r2.Close() })
			return r2
		},
		VLLM:      "vllm",
		Container: engine.Container{Image: ocitest.SimImageRef, ShmBytes: 64 << 20},
	})
	// Nothing of this node is left behind.
	n, err := rt.Sweep(context.Background(), nil)
	require.NoError(t, err)
	require.Zero(t, n, "every container was deleted by Stop")

	// Sweep removes this owner's stray containers and only those.
	h, err := rt.Start(context.Background(), engine.Command{Name: "stray", Path: "vllm", Args: []string{"serve", "/m", "--port", "1"},
		Container: engine.Container{Image: ocitest.SimImageRef}})
	require.NoError(t, err)
	other := cfg
	other.Owner = t.TempDir()
	ort, err := New(context.Background(), other)
	require.NoError(t, err)
	defer ort.Close()
	n, err = ort.Sweep(context.Background(), nil)
	require.NoError(t, err)
	require.Zero(t, n, "another owner's containers are not touched")
	n, err = rt.Sweep(context.Background(), nil)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	select {
	case <-h.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the swept container's task did not end")
	}
}

// TestContainerSpec checks what an engine container gets: host network, a
// sized /dev/shm, IPC_LOCK, the memlock limit, the model read-only, the GPUs
// (device nodes, then CDI with only this agent's GPUs) and its labels.
func TestContainerSpec(t *testing.T) {
	daemon(t)
	dir := t.TempDir()
	dev := t.TempDir()
	// Stand-ins for the GPU and RDMA device nodes (same numbers as /dev/null).
	mknod := func(p string) bool { return unix.Mknod(p, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))) == nil }
	require.NoError(t, os.MkdirAll(filepath.Join(dev, "infiniband"), 0o755))
	haveNodes := mknod(filepath.Join(dev, "nvidia0")) && mknod(filepath.Join(dev, "nvidiactl")) && mknod(filepath.Join(dev, "infiniband", "uverbs0"))
	cfg := Config{Address: socket, Namespace: "shoal-test", LogDir: filepath.Join(dir, "logs"), NodeID: "spec", DevRoot: dev, GPUs: []int{1}, CDIDirs: []string{t.TempDir()}}
	rt, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { rt.Close() }) // after the handles' cleanups (LIFO), which need the client
	importSim(t, rt)
	models := t.TempDir()
	start := func() *Handle {
		h, err := rt.Start(context.Background(), engine.Command{Name: "vllm", Path: "vllm", Args: []string{"--version"},
			Env: []string{"CUDA_VISIBLE_DEVICES=1", "VLLM_HOST_IP=127.0.0.1"},
			Container: engine.Container{Image: ocitest.SimImageRef, ShmBytes: 256 << 20,
				Mounts: []engine.Mount{{Source: models, Target: "/models", ReadOnly: true}}, Labels: map[string]string{"io.shoal.group": "g1"}}})
		require.NoError(t, err)
		t.Cleanup(func() { _ = h.Stop(context.Background(), time.Second) })
		return h.(*Handle)
	}
	h := start()
	s, err := h.ctr.Spec(rt.ctx(context.Background()))
	require.NoError(t, err)
	for _, ns := range s.Linux.Namespaces {
		require.NotEqual(t, specs.NetworkNamespace, ns.Type, "host network")
	}
	var shm, model bool
	for _, m := range s.Mounts {
		if m.Destination == "/dev/shm" {
			shm = slices.Contains(m.Options, "size=262144k")
		}
		if m.Destination == "/models" {
			model = m.Source == models && slices.Contains(m.Options, "ro")
		}
	}
	require.True(t, shm, "/dev/shm sized from the spec: %+v", s.Mounts)
	require.True(t, model, "model mounted read-only: %+v", s.Mounts)
	require.Contains(t, s.Process.Capabilities.Bounding, "CAP_IPC_LOCK")
	require.Contains(t, s.Process.Env, "CUDA_VISIBLE_DEVICES=1", "device nodes: the plan's GPU selection stays")
	var memlockSet bool
	for _, l := range s.Process.Rlimits {
		memlockSet = memlockSet || l.Type == "RLIMIT_MEMLOCK"
	}
	require.True(t, memlockSet)
	if haveNodes {
		var paths []string
		for _, d := range s.Linux.Devices {
			paths = append(paths, d.Path)
		}
		require.Contains(t, paths, filepath.Join(dev, "nvidia0"))
		require.Contains(t, paths, filepath.Join(dev, "nvidiactl"))
		require.Contains(t, paths, filepath.Join(dev, "infiniband", "uverbs0"))
	}
	labels, err := h.ctr.Labels(rt.ctx(context.Background()))
	require.NoError(t, err)
	require.Equal(t, "spec", labels[LabelNode])
	require.Equal(t, "g1", labels["io.shoal.group"])
	waitExit(t, h)
	log, err := os.ReadFile(h.LogPath())
	require.NoError(t, err)
	require.Contains(t, string(log), "0.11.0", "the shim writes the task's output to the log file")

	// With a CDI spec for nvidia.com/gpu, GPUs come through CDI: only this
	// agent's GPU (index 1), which the container sees as its only one.
	cdiDir := "/var/run/cdi"
	require.NoError(t, os.MkdirAll(cdiDir, 0o755))
	cdiFile := filepath.Join(cdiDir, "shoal-test-gpu.yaml")
	require.NoError(t, os.WriteFile(cdiFile, []byte(`cdiVersion: "0.5.0"
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    env: ["SHOAL_TEST_CDI_GPU=0"]
- name: "1"
  containerEdits:
    env: ["SHOAL_TEST_CDI_GPU=1"]
`), 0o644))
	defer os.Remove(cdiFile)
	rt.cfg.CDIDirs = []string{cdiDir}
	h = start()
	s, err = h.ctr.Spec(rt.ctx(context.Background()))
	require.NoError(t, err)
	require.Contains(t, s.Process.Env, "SHOAL_TEST_CDI_GPU=1")
	require.NotContains(t, s.Process.Env, "SHOAL_TEST_CDI_GPU=0")
	for _, e := range s.Process.Env {
		require.NotContains(t, e, "CUDA_VISIBLE_DEVICES", "CDI renumbers the GPUs from 0")
	}
	waitExit(t, h)
}

func waitExit(t *testing.T, h *Handle) {
	t.Helper()
	select {
	case <-h.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("no exit")
	}
}

func TestNewWithoutDaemon(t *testing.T) {
	_, err := New(context.Background(), Config{Address: filepath.Join(t.TempDir(), "missing.sock")})
	require.ErrorContains(t, err, "is containerd installed and running")
}

func TestStartWithoutImage(t *testing.T) {
	daemon(t)
	rt, err := New(context.Background(), Config{Address: socket, Namespace: "shoal-test", LogDir: t.TempDir()})
	require.NoError(t, err)
	defer rt.Close()
	_, err = rt.Start(context.Background(), engine.Command{Name: "vllm", Path: "vllm"})
	require.ErrorContains(t, err, "engine.image is required")
	_, err = rt.Start(context.Background(), engine.Command{Name: "vllm", Path: "vllm", Container: engine.Container{Image: "registry.invalid/none:1"}})
	require.ErrorContains(t, err, "ctr -n shoal-test images import")
}
