package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestCommandEngineTorch runs examples/torch-tp (a real torch.distributed
// program; gloo on this CPU machine, NCCL on GPUs) through the command engine
// kind on two agents: rank 0 on the elected head, a completion computed by
// both ranks, then kill -9 of the worker rank: the group stops and restarts
// whole and serves again, with no orphan process.
func TestCommandEngineTorch(t *testing.T) {
	py := ""
	for _, p := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(p, "-c", "import torch").Run() == nil {
			py = p
			break
		}
	}
	if py == "" {
		t.Skip("no python3 with torch here (.ci/run installs Debian's python3-torch): the command-engine torch test needs it")
	}
	e := startCluster(t, 13, 2)
	abs, err := filepath.Abs("../../examples/torch-tp/engine.py")
	require.NoError(t, err)
	b, err := os.ReadFile("../../examples/torch-tp/deployment.yaml")
	require.NoError(t, err)
	e.apply("torch.yaml", strings.Replace(strings.ReplaceAll(string(b), "ENGINE_PY", abs), `["python3",`, `["`+py+`",`, 1))
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 1 }, 120*time.Second, 200*time.Millisecond)
	r0 := e.replicas()[0]

	complete := func() (int, map[string]any) {
		resp, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"torch-tp","prompt":"hello","max_tokens":8}`))
		if err != nil {
			return 0, nil
		}
		defer resp.Body.Close()
		var v map[string]any
		b, _ := io.ReadAll(resp.Body)
		_ = json.Unmarshal(b, &v)
		return resp.StatusCode, v
	}
	code, v := complete()
	require.Equal(t, 200, code, "%v", v)
	require.Len(t, v["token_ids"], 8)
	require.Equal(t, 2.0, v["ranks"], "the work ran on both ranks")

	// kill -9 the worker rank's process (not its agent).
	var worker string
	for _, n := range e.nodes() {
		if n.Role == "worker" {
			worker = n.NodeID
		}
	}
	require.NotEmpty(t, worker)
	pids := e.c.EnginePids(worker)
	require.Len(t, pids, 1)
	require.NoError(t, syscall.Kill(pids[0], syscall.SIGKILL))
	killed := time.Now()
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 0 }, 10*time.Second, 50*time.Millisecond, "head reports NOT_SERVING")
	notServing := time.Since(killed)
	require.Eventually(t, func() bool {
		rs := e.replicas()
		return len(rs) == 1 && rs[0].State == "ready"
	}, 120*time.Second, 200*time.Millisecond)
	back := time.Since(killed)
	rs := e.replicas()
	require.Equal(t, r0.Epoch, rs[0].Epoch, "same members, same epoch: the group restarted in place")
	code, v = complete()
	require.Equal(t, 200, code, "%v", v)
	t.Logf("TORCH: worker rank killed; replica not serving after %.2fs, serving again after %.2fs", notServing.Seconds(), back.Seconds())
	// No orphan: exactly one engine process per member, all recorded and alive.
	all := append(e.c.EnginePids("node-1"), e.c.EnginePids("node-2")...)
	require.Len(t, all, 2)
	require.NotContains(t, all, pids[0])
	for _, p := range all {
		require.NoError(t, syscall.Kill(p, 0))
	}
	outPs, _ := exec.Command("pgrep", "-f", abs).Output()
	require.Len(t, strings.Fields(string(outPs)), 2, "only the two live ranks run engine.py")
}
