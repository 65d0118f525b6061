package agent

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/gpu"
	"github.com/shoalhq/shoal/spec"
)

// adoptFixture: an agent over a state dir, and a state whose run has two
// engine processes (sleeps standing in for ray and vllm).
func adoptFixture(t *testing.T) (*Agent, State, []engine.Handle) {
	t.Helper()
	dir := t.TempDir()
	ins, err := gpu.New("none")
	require.NoError(t, err)
	a, err := New(Config{NodeID: "n1", Address: "127.0.0.1", StateDir: dir, StopGrace: time.Second,
		Containerd: ContainerdConfig{Address: dir + "/no-containerd.sock"}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, ins, nil)
	require.NoError(t, err)
	rt := process.New(dir + "/logs")
	var hs []engine.Handle
	for _, name := range []string{"ray", "vllm"} {
		h, err := rt.Start(context.Background(), engine.Command{Name: name, Path: "/bin/sleep", Args: []string{"300"}})
		require.NoError(t, err)
		t.Cleanup(func() { _ = h.Stop(context.Background(), time.Second) })
		hs = append(hs, h)
	}
	d := &spec.Deployment{Name: "d", Engine: spec.Engine{ServedModelName: "m", StartupTimeoutSeconds: 5}}
	st := State{NodeID: "n1",
		Assignment: &Assignment{Deployment: "d", Group: "g1", Epoch: 3, Members: []Member{{NodeID: "n1"}, {NodeID: "n2", Rank: 1}}, Spec: d},
		Run: &RunRecord{Group: "g1", Epoch: 3, Term: 7, Head: "n2", Role: engine.RoleWorker, Runtime: "process",
			Plan: &engine.Plan{Role: engine.RoleWorker, Node: engine.Command{Name: "ray", Path: "/bin/sleep"}}},
		Engines: []engine.Record{hs[0].Record(), hs[1].Record()}}
	return a, st, hs
}

func TestAdoptResumesAWholeRun(t *testing.T) {
	a, st, hs := adoptFixture(t)
	r := a.adopt(context.Background(), &st)
	require.NotNil(t, r)
	require.Equal(t, uint64(7), r.info.Term)
	require.Equal(t, "n2", r.info.Head)
	require.Equal(t, []int{hs[0].Pid(), hs[1].Pid()}, r.r.Pids())
	require.NotNil(t, st.Run, "the run stays recorded")
	require.Len(t, st.Engines, 2)
	// An adopted engine's exit fails the run, as a started one's does.
	require.NoError(t, hs[1].Stop(context.Background(), time.Second))
	for r.r.Status().Failed == "" { // the runner wakes the loop (a.wake) on every change
		select {
		case <-a.wake:
		case <-time.After(10 * time.Second):
			t.Fatal("the adopted run did not fail")
		}
	}
	require.Contains(t, r.r.Status().Failed, "vllm exited")
	r.r.Detach()
	<-r.r.Done()
}

func TestAdoptStopsTheRestOfABrokenRun(t *testing.T) {
	a, st, hs := adoptFixture(t)
	// vllm died while the agent was down: the group can only restart whole,
	// so the surviving ray must not be left holding the GPUs.
	require.NoError(t, hs[1].Stop(context.Background(), time.Second))
	require.Nil(t, a.adopt(context.Background(), &st))
	select {
	case <-hs[0].Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the surviving engine was not stopped")
	}
	require.Nil(t, st.Run)
	require.Empty(t, st.Engines)
}

func TestAdoptStopsEnginesOfAnOldAssignment(t *testing.T) {
	a, st, hs := adoptFixture(t)
	st.Assignment.Epoch = 4 // the node was re-assigned while the agent was down
	require.Nil(t, a.adopt(context.Background(), &st))
	for _, h := range hs {
		select {
		case <-h.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("an engine of the old epoch was not stopped")
		}
	}
}
