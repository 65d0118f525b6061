package runner

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
)

// Intervals of the sequences. Polls of local processes, not of the network.
const (
	gatePoll  = 200 * time.Millisecond // ray status while the head waits for its workers' GPUs
	readyPoll = 250 * time.Millisecond // the readiness probe until the engine is ready
	superPoll = time.Second            // health, metrics and hang checks of a ready engine
	headPoll  = 200 * time.Millisecond // a worker waiting for its head's node process
	// unhealthyAfter consecutive failed health checks fail a ready engine.
	unhealthyAfter = 3
)

// prepare resolves the runtime and readies the weights; false means the run
// failed or ended.
func (r *Runner) prepare() bool {
	if r.runtime() == nil {
		rt, err := r.cfg.Runtime(r.ctx)
		if err != nil {
			if r.ctx.Err() == nil {
				r.fail("engine runtime: " + err.Error())
			}
			return false
		}
		r.mu.Lock()
		r.rt = rt
		r.mu.Unlock()
	}
	if r.cfg.Weights == nil {
		return true
	}
	if r.cfg.Downloads {
		r.setPhase(gossip.EngineDownloading)
	}
	err := r.cfg.Weights(r.ctx, func(p string) {
		r.setProgress(p)
		r.cfg.Notify()
	})
	r.setProgress("")
	if r.ctx.Err() != nil {
		return false
	}
	if err != nil {
		r.fail(err.Error())
		return false
	}
	return true
}

// headSequence: weights → the node process (ray head) → all N×G GPUs in Ray
// → the server (vllm serve) → ready → supervision.
func (r *Runner) headSequence() {
	if !r.prepare() {
		return
	}
	p := r.cfg.Plan
	if !r.launch(p.Node) || !r.launchExtra() {
		return
	}
	r.setPhase(gossip.EngineRunning)
	deadline := time.Now().Add(r.cfg.StartupTimeout)
	if !r.gpuGate(deadline) {
		return
	}
	if p.Serve != nil && !r.launch(*p.Serve) {
		return
	}
	r.setPhase(gossip.EngineLoading)
	r.serveLoop(deadline)
}

// gpuGate waits until Ray reports the plan's N×G GPUs (no sleeps standing in
// for readiness); false means the run failed or ended.
func (r *Runner) gpuGate(deadline time.Time) bool {
	p := r.cfg.Plan
	var lastLog time.Time
	for p.ExpectedGPUs > 0 {
		st, err := r.rayStatus()
		if err == nil && st.TotalGPUs >= float64(p.ExpectedGPUs) {
			r.log.Info("ray cluster complete", "gpus", st.TotalGPUs, "nodes", st.ActiveNodes)
			return true
		}
		if r.ctx.Err() != nil {
			return false
		}
		if time.Since(lastLog) > 10*time.Second {
			r.log.Info("waiting for ray workers", "want_gpus", p.ExpectedGPUs, "have_gpus", st.TotalGPUs, "err", err)
			lastLog = time.Now()
		}
		if time.Now().After(deadline) {
			r.fail(fmt.Sprintf("ray reported %v of %d GPUs within %v", st.TotalGPUs, p.ExpectedGPUs, r.cfg.StartupTimeout))
			return false
		}
		if !r.sleep(gatePoll) {
			return false
		}
	}
	return true
}

// rayStatus runs `ray status` beside the head's Ray node (in its container
// for containerd), with the node's environment and RAY_ADDRESS.
func (r *Runner) rayStatus() (engine.RayStatus, error) {
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	n := r.node()
	if n == nil {
		return engine.RayStatus{}, errors.New("ray status: the head's ray node is not running")
	}
	p := r.cfg.Plan
	c := engine.Command{Name: "ray", Path: p.Node.Path, Args: []string{"status"},
		Env: append(append([]string(nil), p.Node.Env...), "RAY_ADDRESS="+p.RayAddress)}
	out, err := r.runtime().Exec(ctx, n, c)
	if err != nil {
		return engine.RayStatus{}, fmt.Errorf("ray status: %w: %s", err, bytes.TrimSpace(out))
	}
	return engine.ParseRayStatus(string(out))
}

// serveLoop waits for the engine to be ready, then supervises it: health,
// metrics, hang detection and the idle canary.
func (r *Runner) serveLoop(deadline time.Time) {
	for {
		err := r.cfg.Prober.Ready(r.ctx)
		if err == nil {
			break
		}
		if r.ctx.Err() != nil {
			return
		}
		if time.Now().After(deadline) {
			r.fail(fmt.Sprintf("engine not ready within %v: %v", r.cfg.StartupTimeout, err))
			return
		}
		if !r.sleep(readyPoll) {
			return
		}
	}
	r.log.Info("replica ready", "endpoint", r.cfg.Plan.Endpoint)
	r.setPhase(gossip.EngineReady)
	bad := 0
	lastCanary := time.Now()
	for r.sleep(superPoll) {
		now := time.Now()
		if r.cfg.CanaryInterval > 0 && now.Sub(lastCanary) >= r.cfg.CanaryInterval && r.idleSince(lastCanary) {
			lastCanary = now
			if err := r.cfg.Prober.Canary(r.ctx); err != nil && r.ctx.Err() == nil {
				r.fail("idle canary failed: " + err.Error())
				return
			}
		}
		if stuck := r.stalled(now); stuck > 0 {
			r.fail(fmt.Sprintf("engine hung: %v with requests running and no token generated", stuck.Round(time.Second)))
			return
		}
		m, err := r.cfg.Prober.Scrape(r.ctx)
		if r.ctx.Err() != nil {
			return
		}
		if err != nil {
			bad++
			r.log.Warn("engine check failed", "err", err, "consecutive", bad)
			if bad >= unhealthyAfter {
				r.fail("engine unhealthy: " + err.Error())
				return
			}
			continue
		}
		bad = 0
		r.mu.Lock()
		r.ms.observe(m, time.Now())
		r.mu.Unlock()
		r.cfg.Notify() // fresh metrics for the Replica API
	}
}

func (r *Runner) idleSince(t time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ms.idleSince(t)
}

func (r *Runner) stalled(now time.Time) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ms.stalled(now, r.cfg.HangTimeout)
}

// workerSequence: weights → wait for the head's node process → the node
// process (ray worker, or a native engine's rank); its exit fails the run.
func (r *Runner) workerSequence() {
	if !r.prepare() {
		return
	}
	// The head may still be pulling its weights: join once its node runs.
	deadline := time.Now().Add(r.cfg.StartupTimeout)
	for r.cfg.HeadUp != nil && !r.cfg.HeadUp() {
		if time.Now().After(deadline) {
			r.fail(fmt.Sprintf("head did not start its engine within %v", r.cfg.StartupTimeout))
			return
		}
		if !r.sleep(headPoll) {
			return
		}
	}
	if r.launch(r.cfg.Plan.Node) && r.launchExtra() {
		r.setPhase(gossip.EngineRunning)
	}
}

// launchExtra starts the plan's further processes (a rank each).
func (r *Runner) launchExtra() bool {
	for _, c := range r.cfg.Plan.Extra {
		if !r.launch(c) {
			return false
		}
	}
	return true
}

// launch starts c; false means the run failed (said why) or ended.
func (r *Runner) launch(c engine.Command) bool {
	if _, err := r.startProc(c); err != nil {
		if r.ctx.Err() == nil {
			r.fail("start " + c.Name + ": " + err.Error())
		}
		return false
	}
	return true
}
