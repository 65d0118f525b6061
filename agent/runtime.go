package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/agent/runner"
	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/containerd"
	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/internal/bytesize"
	"github.com/shoalhq/shoal/spec"
)

func (a *Agent) logDir() string { return filepath.Join(a.cfg.StateDir, "logs") }

// runtimes caches the engine runtimes by kind. Connecting to containerd is
// I/O (seconds when the daemon is slow), so it happens outside the lock; two
// callers racing for the first connection keep one and close the other.
type runtimes struct {
	open func(ctx context.Context, kind string) (engine.Runtime, error)
	mu   sync.Mutex
	m    map[string]engine.Runtime // guarded by mu
}

func (c *runtimes) get(ctx context.Context, kind string) (engine.Runtime, error) {
	if kind == "" {
		kind = "process"
	}
	c.mu.Lock()
	rt, ok := c.m[kind]
	c.mu.Unlock()
	if ok {
		return rt, nil
	}
	rt, err := c.open(ctx, kind)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if have, ok := c.m[kind]; ok {
		closeRuntime(rt)
		return have, nil
	}
	c.m[kind] = rt
	return rt, nil
}

func (c *runtimes) closeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, rt := range c.m {
		closeRuntime(rt)
		delete(c.m, k)
	}
}

func closeRuntime(rt engine.Runtime) {
	if cl, ok := rt.(interface{ Close() error }); ok {
		_ = cl.Close()
	}
}

// openRuntime connects the runtime of a deployment's engine.runtime.
func (a *Agent) openRuntime(ctx context.Context, kind string) (engine.Runtime, error) {
	switch kind {
	case "process":
		return process.New(a.logDir()), nil
	case "containerd":
		c := a.cfg.Containerd
		return containerd.New(ctx, containerd.Config{Address: c.Address, Namespace: c.Namespace, Snapshotter: c.Snapshotter,
			LogDir: a.logDir(), NodeID: a.cfg.NodeID, Owner: a.cfg.StateDir, GPUs: a.cfg.GPUs, Log: a.log})
	}
	return nil, fmt.Errorf("unknown engine runtime %q", kind)
}

// containerize fills what the containerd runtime needs on a plan's commands:
// the image, /dev/shm, the weights read-only at the path the engine is given,
// and labels naming the run.
func containerize(p *engine.Plan, sp *spec.Deployment, labels map[string]string) error {
	shm := int64(0)
	if sp.Engine.ShmSize != "" {
		var err error
		if shm, err = bytesize.Parse(sp.Engine.ShmSize); err != nil {
			return fmt.Errorf("engine.shmSize: %w", err)
		}
	}
	c := engine.Container{Image: sp.Engine.Image, ShmBytes: shm, Labels: labels}
	if dir := sp.Model.Path; dir != "" {
		if _, err := os.Stat(dir); err == nil {
			c.Mounts = []engine.Mount{{Source: dir, Target: dir, ReadOnly: true}}
		}
	}
	p.Node.Container = c
	for i := range p.Extra {
		p.Extra[i].Container = c
	}
	if p.Serve != nil {
		p.Serve.Container = c
	}
	return nil
}

// adopt re-attaches the engines an earlier agent process left running. It
// returns the run to resume, or nil; engines of a run that cannot be resumed
// whole (one of them gone, the assignment changed) are stopped, since a
// group can only restart as a whole. It runs before gossip starts.
func (a *Agent) adopt(ctx context.Context, st *State) *activeRun {
	rec, records := st.Run, st.Engines
	st.Run, st.Engines = nil, nil
	as := st.Assignment
	whole := rec != nil && rec.Plan != nil && as != nil && as.Group == rec.Group && as.Epoch == rec.Epoch && len(records) > 0
	var handles []engine.Handle
	var rt engine.Runtime
	for _, e := range records {
		ert, err := a.rts.get(ctx, e.Runtime)
		if err != nil {
			a.log.Error("cannot reach the runtime of an engine left by the previous agent", "engine", e.Name, "runtime", e.Runtime, "err", err)
			whole = false
			continue
		}
		rt = ert
		h, err := ert.Adopt(ctx, e)
		if err != nil {
			if !errors.Is(err, engine.ErrGone) {
				a.log.Error("adopt engine", "engine", e.Name, "err", err)
			} else {
				a.log.Info("engine left by the previous agent is gone", "engine", e.Name, "pid", e.Pid)
			}
			whole = false
			continue
		}
		handles = append(handles, h)
	}
	a.sweepContainers(ctx, handles)
	if !whole || rt == nil || rec.Runtime != rt.Kind() {
		for _, h := range handles {
			a.log.Warn("stopping an engine of a run that cannot resume whole", "engine", h.Name(), "pid", h.Pid())
			if err := h.Stop(ctx, a.cfg.StopGrace); err != nil {
				a.log.Error("stop engine", "engine", h.Name(), "err", err)
			}
		}
		if len(handles) > 0 && rec != nil && rec.Plan != nil && rec.Plan.RayStop {
			a.rayStopForce(ctx, rec.Plan)
		}
		return nil
	}
	for _, h := range handles {
		st.Engines = append(st.Engines, h.Record())
	}
	st.Run = rec
	info := RunInfo{Group: rec.Group, Epoch: rec.Epoch, Term: rec.Term, Head: rec.Head, Role: rec.Role}
	r := runner.Adopt(a.runnerConfig(as, info, rec.Plan, rt.Kind()), rt, handles)
	a.log.Info("adopted the running engine", "group", rec.Group, "epoch", rec.Epoch, "term", rec.Term, "role", string(rec.Role), "pids", r.Pids())
	return &activeRun{r: r, info: info, plan: rec.Plan, kind: rt.Kind()}
}

// sweepContainers removes this node's containers that no adopted engine owns
// (a run stopped while the agent was down, a crash between create and
// record). Without a containerd daemon there is nothing to sweep.
func (a *Agent) sweepContainers(ctx context.Context, keep []engine.Handle) {
	addr := a.cfg.Containerd.Address
	if addr == "" {
		addr = containerd.DefaultAddress
	}
	if _, err := os.Stat(addr); err != nil {
		return
	}
	rt, err := a.rts.get(ctx, "containerd")
	if err != nil {
		a.log.Debug("containerd sweep skipped", "err", err)
		return
	}
	var recs []engine.Record
	for _, h := range keep {
		recs = append(recs, h.Record())
	}
	if n, err := rt.(*containerd.Runtime).Sweep(ctx, recs); err != nil {
		a.log.Error("remove stale engine containers", "err", err)
	} else if n > 0 {
		a.log.Warn("removed engine containers no run owns", "count", n)
	}
}

// rotateLogs rotates the engine logs that grew past the limit (copy and
// truncate: the engines keep their open file).
func (a *Agent) rotateLogs(ctx context.Context) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		entries, err := os.ReadDir(a.logDir())
		if err != nil {
			continue
		}
		for _, e := range entries {
			if e.IsDir() || !strings.HasSuffix(e.Name(), ".log") {
				continue
			}
			p := filepath.Join(a.logDir(), e.Name())
			if ok, err := engine.RotateLog(p, a.cfg.LogMaxBytes, a.cfg.LogKeep); err != nil {
				a.log.Warn("rotate engine log", "log", p, "err", err)
			} else if ok {
				a.log.Info("rotated engine log", "log", p, "keep", a.cfg.LogKeep)
			}
		}
	}
}
