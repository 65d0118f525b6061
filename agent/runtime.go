package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/containerd"
	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/spec"
)

func (a *Agent) logDir() string { return filepath.Join(a.cfg.StateDir, "logs") }

// runtimeFor returns the runtime for a deployment's engine.runtime, connecting
// to containerd on first use.
func (a *Agent) runtimeFor(ctx context.Context, kind string) (engine.Runtime, error) {
	if kind == "" {
		kind = "process"
	}
	a.rtMu.Lock()
	defer a.rtMu.Unlock()
	if rt, ok := a.rts[kind]; ok {
		return rt, nil
	}
	var rt engine.Runtime
	switch kind {
	case "process":
		rt = process.New(a.logDir())
	case "containerd":
		c := a.cfg.Containerd
		crt, err := containerd.New(ctx, containerd.Config{Address: c.Address, Namespace: c.Namespace, Snapshotter: c.Snapshotter,
			LogDir: a.logDir(), NodeID: a.cfg.NodeID, Owner: a.cfg.StateDir, GPUs: a.cfg.GPUs})
		if err != nil {
			return nil, err
		}
		rt = crt
	default:
		return nil, fmt.Errorf("unknown engine runtime %q", kind)
	}
	a.rts[kind] = rt
	return rt, nil
}

// containerize fills what the containerd runtime needs on a plan's commands:
// the image, /dev/shm, the weights read-only at the path the engine is given,
// and labels naming the run.
func containerize(p *engine.Plan, sp *spec.Deployment, labels map[string]string) error {
	shm := int64(0)
	if sp.Engine.ShmSize != "" {
		var err error
		if shm, err = spec.ParseBytes(sp.Engine.ShmSize); err != nil {
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
	if p.Serve != nil {
		p.Serve.Container = c
	}
	return nil
}

// recordEngine persists a started engine so that a restarted agent adopts it.
func (a *Agent) recordEngine(h engine.Handle) {
	a.mu.Lock()
	a.state.Engines = append(a.state.Engines, h.Record())
	st := a.state
	a.mu.Unlock()
	if err := st.Save(a.cfg.StateDir); err != nil {
		a.log.Error("persist engine record", "err", err)
	}
}

// adopt re-attaches the engines an earlier agent process left running. It
// returns the run to resume, or nil; engines of a run that cannot be resumed
// whole (one of them gone, the assignment changed) are stopped, since a
// group can only restart as a whole. It runs before gossip starts.
func (a *Agent) adopt(ctx context.Context, st *State) *run {
	rec, records := st.Run, st.Engines
	st.Run, st.Engines = nil, nil
	as := st.Assignment
	whole := rec != nil && rec.Plan != nil && as != nil && as.Group == rec.Group && as.Epoch == rec.Epoch && len(records) > 0
	var handles []engine.Handle
	var rt engine.Runtime
	for _, e := range records {
		kind := e.Runtime
		if kind == "" {
			kind = "process"
		}
		ert, err := a.runtimeFor(ctx, kind)
		if err != nil {
			a.log.Error("cannot reach the runtime of an engine left by the previous agent", "engine", e.Name, "runtime", kind, "err", err)
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
	if !whole || rec.Runtime != rt.Kind() {
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
	r := a.newRun(as, rec.Role, rec.Head, rec.Term, rec.Plan, rt, nil)
	r.procs = handles
	for _, h := range handles {
		r.watchExit(h)
	}
	r.log.Info("adopted the running engine", "pids", pids(handles))
	return r
}

func pids(hs []engine.Handle) []int {
	var out []int
	for _, h := range hs {
		out = append(out, h.Pid())
	}
	return out
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
	rt, err := a.runtimeFor(ctx, "containerd")
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

// resume installs an adopted run once gossip runs: the head claims its term
// again and serves, a worker follows its head again.
func (a *Agent) resume(r *run) {
	a.mu.Lock()
	a.run = r
	if r.role == engine.RoleHead {
		a.claim, a.follow, a.fterm = r.term, a.cfg.NodeID, r.term
		a.es = gossip.EngineLoading
	} else {
		a.follow, a.fterm = r.head, r.term
		a.es = gossip.EngineRunning
	}
	r.phase = a.es
	a.mu.Unlock()
	if r.role == engine.RoleHead {
		a.replica.start()
		go a.adoptedHeadSequence(r)
		a.watchMembers(r, a.state.Assignment.Members)
	} else {
		go func() {
			defer close(r.done)
			<-r.ctx.Done()
		}()
	}
}

// rotateLogs rotates the engine logs that grew past the limit.
func (a *Agent) rotateLogs(ctx context.Context) {
	for sleepCtx(ctx, 10*time.Second) {
		a.mu.Lock()
		r := a.run
		a.mu.Unlock()
		if r == nil {
			continue
		}
		r.mu.Lock()
		procs := append([]engine.Handle(nil), r.procs...)
		r.mu.Unlock()
		for _, h := range procs {
			if ok, err := engine.RotateLog(h.LogPath(), a.cfg.LogMaxBytes, a.cfg.LogKeep); err != nil {
				a.log.Warn("rotate engine log", "log", h.LogPath(), "err", err)
			} else if ok {
				a.log.Info("rotated engine log", "log", h.LogPath(), "keep", a.cfg.LogKeep)
			}
		}
	}
}
