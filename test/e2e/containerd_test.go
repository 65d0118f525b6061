package e2e

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	ctd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine/containerd"
	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/internal/ocitest"
)

const containerdSocket = "/run/containerd/containerd.sock"

// specContainerd is the 2-node ray-vllm demo run as containers of the
// simulator image.
const specContainerd = `apiVersion: shoal/v1
kind: Deployment
name: demo
model: {source: /models/demo}
engine: {kind: ray-vllm, runtime: containerd, image: "` + ocitest.SimImageRef + `", shmSize: 1Gi, servedModelName: demo, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8, gpuModel: H200}
replicas: {count: 1}
`

// TestContainerdReplica runs a 2-node Ray+vLLM replica as containerd
// containers (the simulator's OCI image, built and imported by the test, on
// the real daemon CI starts): it serves through the router; a restarted head
// agent adopts its containers; killing the worker's ray process stops the
// group and re-forms it; deleting the deployment leaves no container.
func TestContainerdReplica(t *testing.T) {
	if _, err := os.Stat(containerdSocket); err != nil || os.Geteuid() != 0 {
		if os.Getenv("SHOAL_REQUIRE_CONTAINERD") == "1" {
			t.Fatalf("SHOAL_REQUIRE_CONTAINERD=1 but no containerd at %s (or not root): %v", containerdSocket, err)
		}
		t.Skip("no containerd daemon (root) here; CI starts one")
	}
	const ns = "shoal-e2e"
	rt, err := containerd.New(context.Background(), containerd.Config{Address: containerdSocket, Namespace: ns})
	require.NoError(t, err)
	defer rt.Close()
	nsctx := namespaces.WithNamespace(context.Background(), ns)
	tarball, err := ocitest.SimImage(t.TempDir())
	require.NoError(t, err)
	f, err := os.Open(tarball)
	require.NoError(t, err)
	_, err = rt.Client().Import(nsctx, f, ctd.WithAllPlatforms(true))
	f.Close()
	require.NoError(t, err)
	containers := func() []string {
		cs, err := rt.Client().Containers(nsctx)
		require.NoError(t, err)
		var ids []string
		for _, c := range cs {
			ids = append(ids, c.ID())
		}
		return ids
	}
	t.Cleanup(func() { // after the cluster stopped: nothing may linger in the daemon
		_, _ = rt.Sweep(context.Background(), nil)
		for _, n := range []string{"node-1", "node-2"} {
			r, err := containerd.New(context.Background(), containerd.Config{Address: containerdSocket, Namespace: ns, NodeID: n})
			if err == nil {
				_, _ = r.Sweep(context.Background(), nil)
				r.Close()
			}
		}
	})

	e := startCluster(t, 24, 2, func(c *devcluster.Config) {
		c.KeepEngines = true
		c.AgentArgs = []string{"--containerd-namespace", ns}
	})
	e.apply("ctr.yaml", specContainerd)
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 90*time.Second, 250*time.Millisecond)
	before := e.replicas()[0]
	require.Len(t, containers(), 3, "ray head, vllm, ray worker")
	post := func() int {
		r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"hi","max_tokens":3}`))
		if err != nil {
			return 0
		}
		r.Body.Close()
		return r.StatusCode
	}
	require.Equal(t, 200, post())
	idx := map[string]int{}
	for _, n := range e.nodes() {
		for i := 0; i < 2; i++ {
			if n.Address == e.c.AgentIP(i) {
				idx[n.NodeID] = i
			}
		}
	}
	headLog := func() string {
		b, _ := os.ReadFile(filepath.Join(e.dir, "logs", before.Head+".log"))
		return string(b)
	}
	require.Contains(t, headLog(), "runtime=containerd")
	// The engine's own output reaches the agent's log directory (written by the shim).
	vlog, err := os.ReadFile(filepath.Join(e.dir, before.Head, "logs", "vllm.log"))
	require.NoError(t, err)
	require.Contains(t, string(vlog), "Application startup complete")

	// The head's agent restarts: it adopts its containers by id.
	ids := containers()
	require.NoError(t, e.c.Restart(idx[before.Head]))
	require.Eventually(t, func() bool { return strings.Contains(headLog(), "adopted the running engine") }, 20*time.Second, 100*time.Millisecond)
	require.Eventually(t, func() bool { return post() == 200 }, 20*time.Second, 100*time.Millisecond)
	require.ElementsMatch(t, ids, containers(), "the same containers serve")
	require.Equal(t, before.Epoch, e.replicas()[0].Epoch)

	// The worker's ray process dies (its container's main process): the
	// group stops (no container of the old term is left) and re-forms.
	var worker string
	for _, m := range before.Members {
		if m != before.Head {
			worker = m
		}
	}
	wp := e.c.EnginePids(worker)
	require.Len(t, wp, 1)
	killed := time.Now()
	require.NoError(t, syscall.Kill(wp[0], syscall.SIGKILL))
	require.Eventually(t, func() bool {
		for _, id := range containers() {
			for _, old := range ids {
				if id == old {
					return false
				}
			}
		}
		return true
	}, 15*time.Second, 100*time.Millisecond, "every container of the failed group is stopped and deleted")
	t.Logf("worker ray killed → all 3 old containers gone in %v", time.Since(killed).Round(10*time.Millisecond))
	require.Less(t, time.Since(killed), 10*time.Second)
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 && post() == 200 }, 60*time.Second, 250*time.Millisecond)
	t.Logf("serving again %v after the kill", time.Since(killed).Round(10*time.Millisecond))

	_, err = e.shoal("delete", "deployment", "demo")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(containers()) == 0 }, 30*time.Second, 200*time.Millisecond, "deleting the deployment deletes its containers")
}
