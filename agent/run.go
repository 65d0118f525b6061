package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
)

// run is one start of the engine for one (group, epoch, term) in one role. Its
// goroutine starts processes and advances phases; the supervisor loop alone
// stops it. Processes start under mu after a ctx check, and stop takes mu after
// cancelling ctx, so nothing starts after a stop.
type run struct {
	group string
	epoch uint64
	term  uint64
	head  string
	role  engine.Role
	plan  *engine.Plan
	rt    engine.Runtime
	spec  *specRef
	model *modelJob
	// headUp says whether the head's node process runs (workers join then).
	headUp func() bool
	log    *slog.Logger
	wake   func()

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	procs    []engine.Handle // guarded by mu; in start order
	phase    string          // guarded by mu
	failed   string          // guarded by mu; why the run failed
	progress string          // guarded by mu; weight pull progress for gossip
	metrics  metricsState    // guarded by mu
}

type specRef struct {
	served  string
	timeout time.Duration
	hang    time.Duration
	canary  time.Duration
}

type metricsState struct {
	last     engine.Metrics
	progress time.Time // last time tokens were generated, or nothing was running
	lastGen  time.Time // last time tokens were generated
	lastAt   time.Time
	tokPerS  float64
	ttftAvg  float64
	hitRate  float64
	have     bool
}

func (r *run) setPhase(p string) {
	r.mu.Lock()
	r.phase = p
	r.mu.Unlock()
	r.wake()
}

func (r *run) fail(why string) {
	r.mu.Lock()
	if r.failed == "" {
		r.failed = why
	}
	r.mu.Unlock()
	r.wake()
}

func (r *run) downloadProgress() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.progress
}

func (r *run) state() (phase, failed string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.phase, r.failed
}

// start runs c unless the run was stopped, and fails the run when it exits.
func (r *run) start(c engine.Command, rec func(engine.Handle)) (engine.Handle, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ctx.Err() != nil {
		return nil, r.ctx.Err()
	}
	h, err := r.rt.Start(r.ctx, c)
	if err != nil {
		return nil, err
	}
	r.procs = append(r.procs, h)
	rec(h)
	r.log.Info("engine process started", "name", c.Name, "runtime", r.rt.Kind(), "pid", h.Pid(), "argv", strings.Join(c.Argv(), " "), "log", h.LogPath())
	r.watchExit(h)
	return h, nil
}

// watchExit fails the run when h exits while the run is meant to go on.
func (r *run) watchExit(h engine.Handle) {
	go func() {
		<-h.Done()
		if r.ctx.Err() == nil {
			r.fail(fmt.Sprintf("%s exited (%v); see %s", h.Name(), h.Err(), h.LogPath()))
		}
	}()
}

// node is the handle of the plan's node command (ray start, the program).
func (r *run) node() engine.Handle {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.procs) == 0 {
		return nil
	}
	return r.procs[0]
}

// stop ends the run's processes: newest first (vllm before ray), each SIGTERM,
// grace, SIGKILL to its group (or container); then, for bare processes,
// `ray stop --force` for anything Ray left.
func (r *run) stop(grace time.Duration, rayStop func(context.Context)) {
	r.cancel()
	r.mu.Lock()
	procs := r.procs
	r.procs = nil
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), grace+10*time.Second)
	defer cancel()
	for i := len(procs) - 1; i >= 0; i-- {
		if err := procs[i].Stop(ctx, grace); err != nil {
			r.log.Warn("engine process did not stop", "name", procs[i].Name(), "err", err)
		}
	}
	if len(procs) > 0 && rayStop != nil {
		rayStop(ctx)
	}
	<-r.done
}

// headSequence: ray head → wait for N×G GPUs → vllm serve → ready → metrics.
func (a *Agent) headSequence(r *run) {
	defer close(r.done)
	if !a.prepareModel(r) {
		return
	}
	if _, err := r.start(r.plan.Node, a.recordEngine); err != nil {
		r.fail("start " + r.plan.Node.Name + ": " + err.Error())
		return
	}
	r.setPhase(gossip.EngineRunning)
	deadline := time.Now().Add(r.spec.timeout)
	lastLog := time.Time{}
	for r.plan.ExpectedGPUs > 0 {
		st, err := a.rayStatus(r)
		if err == nil && st.TotalGPUs >= float64(r.plan.ExpectedGPUs) {
			r.log.Info("ray cluster complete", "gpus", st.TotalGPUs, "nodes", st.ActiveNodes)
			break
		}
		if time.Since(lastLog) > 10*time.Second {
			r.log.Info("waiting for ray workers", "want_gpus", r.plan.ExpectedGPUs, "have_gpus", st.TotalGPUs, "err", err)
			lastLog = time.Now()
		}
		if time.Now().After(deadline) {
			r.fail(fmt.Sprintf("ray reported %v of %d GPUs within %v", st.TotalGPUs, r.plan.ExpectedGPUs, r.spec.timeout))
			return
		}
		if !sleepCtx(r.ctx, 200*time.Millisecond) {
			return
		}
	}
	if r.plan.Serve != nil {
		if _, err := r.start(*r.plan.Serve, a.recordEngine); err != nil {
			r.fail("start vllm: " + err.Error())
			return
		}
	}
	r.setPhase(gossip.EngineLoading)
	a.serveLoop(r, deadline)
}

// adoptedHeadSequence resumes a head whose engine a previous agent process
// started: the readiness probe (which an already serving engine passes at
// once), then the same supervision.
func (a *Agent) adoptedHeadSequence(r *run) {
	defer close(r.done)
	a.serveLoop(r, time.Now().Add(r.spec.timeout))
}

// serveLoop waits for the engine to be ready, then supervises it: health,
// metrics, hang detection and the idle canary.
func (a *Agent) serveLoop(r *run, deadline time.Time) {
	base := "http://" + r.plan.Endpoint
	for {
		err := probeReady(r.ctx, base, r.spec.served)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			r.fail(fmt.Sprintf("engine not ready within %v: %v", r.spec.timeout, err))
			return
		}
		if !sleepCtx(r.ctx, 250*time.Millisecond) {
			return
		}
	}
	r.log.Info("replica ready", "endpoint", r.plan.Endpoint)
	r.setPhase(gossip.EngineReady)
	bad := 0
	lastCanary := time.Now()
	for sleepCtx(r.ctx, time.Second) {
		if r.spec.canary > 0 && time.Since(lastCanary) >= r.spec.canary && r.idleSince(lastCanary) {
			lastCanary = time.Now()
			if err := canary(r.ctx, base, r.spec.served); err != nil && r.ctx.Err() == nil {
				r.fail("idle canary failed: " + err.Error())
				return
			}
		}
		if stuck := r.stalled(); stuck > 0 {
			r.fail(fmt.Sprintf("engine hung: %v with requests running and no token generated", stuck.Round(time.Second)))
			return
		}
		if err := r.scrape(base); err != nil {
			bad++
			r.log.Warn("engine check failed", "err", err, "consecutive", bad)
			if bad >= 3 {
				r.fail("engine unhealthy: " + err.Error())
				return
			}
			continue
		}
		bad = 0
		r.wake() // publish fresh metrics
	}
}

// workerSequence: ray worker, joined to the head; its exit fails the run.
func (a *Agent) workerSequence(r *run) {
	defer close(r.done)
	if !a.prepareModel(r) {
		return
	}
	// The head may still be pulling its weights: join once its node runs.
	deadline := time.Now().Add(r.spec.timeout)
	for r.headUp != nil && !r.headUp() {
		if time.Now().After(deadline) {
			r.fail(fmt.Sprintf("head did not start its engine within %v", r.spec.timeout))
			return
		}
		if !sleepCtx(r.ctx, 200*time.Millisecond) {
			return
		}
	}
	if _, err := r.start(r.plan.Node, a.recordEngine); err != nil {
		r.fail("start " + r.plan.Node.Name + ": " + err.Error())
		return
	}
	r.setPhase(gossip.EngineRunning)
	<-r.ctx.Done()
}

// watchMembers polls every member's Agent API while this node is head. A
// member whose engine failed, or that left the group, fails the run at once; a
// member whose agent stops answering fails it after MemberGrace (an agent
// restart leaves the member's engine running and comes back within it), still
// well before gossip's failure detector declares the host dead.
func (a *Agent) watchMembers(r *run, members []Member) {
	for _, m := range members {
		if m.NodeID == a.cfg.NodeID {
			continue
		}
		go func(m Member) {
			conn, err := a.cfg.TLS.Dial(m.GRPC)
			if err != nil {
				r.fail(fmt.Sprintf("member %s: %v", m.NodeID, err))
				return
			}
			defer conn.Close()
			c := agentv1.NewAgentClient(conn)
			var since time.Time // first unanswered poll of the current outage
			for sleepCtx(r.ctx, 300*time.Millisecond) {
				asked := time.Now()
				ctx, cancel := context.WithTimeout(r.ctx, time.Second)
				st, err := c.Status(ctx, &agentv1.StatusRequest{})
				cancel()
				if r.ctx.Err() != nil {
					return
				}
				switch {
				case err != nil:
					grace := a.cfg.MemberGrace
					if t, ok := a.mem.Member(m.NodeID); ok && t.Restarting {
						grace = restartGrace // it said it restarts with its engine running
					}
					if since.IsZero() {
						since = asked // the outage began before this poll timed out
						r.log.Warn("member agent does not answer", "member", m.NodeID, "err", err, "grace", grace)
					}
					if time.Since(since) >= grace {
						r.fail(fmt.Sprintf("member %s unreachable for %v: %v", m.NodeID, grace.Round(time.Second), err))
						return
					}
				case st.GetAssignment().GetGroupId() != r.group || st.GetAssignment().GetEpoch() != r.epoch:
					r.fail(fmt.Sprintf("member %s left the group", m.NodeID))
					return
				case st.GetEngineState() == gossip.EngineFailed && st.GetTerm() == r.term:
					r.fail(fmt.Sprintf("member %s engine failed: %s", m.NodeID, st.GetMessage()))
					return
				default:
					since = time.Time{}
				}
			}
		}(m)
	}
}

// rayStatus runs `ray status` beside the head's Ray node (in its container
// for containerd), with the node's environment and RAY_ADDRESS.
func (a *Agent) rayStatus(r *run) (engine.RayStatus, error) {
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	n := r.node()
	if n == nil {
		return engine.RayStatus{}, errors.New("ray status: the head's ray node is not running")
	}
	c := engine.Command{Name: "ray", Path: r.plan.Node.Path, Args: []string{"status"},
		Env: append(append([]string(nil), r.plan.Node.Env...), "RAY_ADDRESS="+r.plan.RayAddress)}
	out, err := r.rt.Exec(ctx, n, c)
	if err != nil {
		return engine.RayStatus{}, fmt.Errorf("ray status: %v: %s", err, bytes.TrimSpace(out))
	}
	return engine.ParseRayStatus(string(out))
}

// rayStopForce runs `ray stop --force` on the host for anything Ray left
// (bare processes only: a container takes its processes with it).
func (a *Agent) rayStopForce(ctx context.Context, p *engine.Plan) {
	if !p.RayStop {
		return
	}
	c := engine.Command{Name: "ray", Path: p.Node.Path, Args: []string{"stop", "--force"}, Env: p.Node.Env}
	if out, err := process.New(a.logDir()).Exec(ctx, nil, c); err != nil {
		a.log.Debug("ray stop --force", "err", err, "out", string(out))
	}
}

var probeClient = &http.Client{Timeout: 5 * time.Second}

// probeReady: /health 200, /v1/models lists the served name, and a one-token
// canary completion succeeds.
func probeReady(ctx context.Context, base, served string) error {
	if err := get(ctx, base+"/health", nil); err != nil {
		return err
	}
	var models struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := get(ctx, base+"/v1/models", &models); err != nil {
		return err
	}
	found := false
	for _, m := range models.Data {
		found = found || m.ID == served
	}
	if !found {
		return fmt.Errorf("/v1/models does not list %q", served)
	}
	return canary(ctx, base, served)
}

// canary sends a one-token completion: the only check that runs a step.
func canary(ctx context.Context, base, served string) error {
	body, _ := json.Marshal(map[string]any{"model": served, "prompt": "ping", "max_tokens": 1})
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(cctx, http.MethodPost, base+"/v1/completions", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := probeClient.Do(req)
	if err != nil {
		return fmt.Errorf("canary: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != 200 {
		return fmt.Errorf("canary: %d %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	return nil
}

func get(ctx context.Context, url string, into any) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := probeClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %d", url, resp.StatusCode)
	}
	if into == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(into)
}

// scrape checks /health and reads /metrics into the run's metrics state.
func (r *run) scrape(base string) error {
	if err := get(r.ctx, base+"/health", nil); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.ctx, 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/metrics", nil)
	resp, err := probeClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	m, err := engine.ParseVLLMMetrics(resp.Body)
	if err != nil {
		return err
	}
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	ms := &r.metrics
	if ms.have {
		dt := now.Sub(ms.lastAt).Seconds()
		if dt > 0 {
			ms.tokPerS = max(0, m.GenerationTokens-ms.last.GenerationTokens) / dt
		}
		if dn := m.TTFTCount - ms.last.TTFTCount; dn > 0 {
			ms.ttftAvg = (m.TTFTSum - ms.last.TTFTSum) / dn
		}
		if dq := m.PrefixQueries - ms.last.PrefixQueries; dq > 0 {
			ms.hitRate = (m.PrefixHits - ms.last.PrefixHits) / dq
		}
	}
	if !ms.have || m.Running+m.Waiting == 0 || m.GenerationTokens > ms.last.GenerationTokens {
		ms.progress = now
	}
	if ms.have && m.GenerationTokens > ms.last.GenerationTokens {
		ms.lastGen = now
	}
	ms.last, ms.lastAt, ms.have = m, now, true
	return nil
}

// idleSince reports that no token was generated since t (traffic would have
// exercised the engine already; a canary is needed only when idle).
func (r *run) idleSince(t time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	ms := r.metrics
	return ms.have && ms.last.Running+ms.last.Waiting == 0 && !ms.lastGen.After(t)
}

// stalled is how long the engine has had requests running or waiting without
// generating a token, once that exceeds the hang timeout (else 0).
func (r *run) stalled() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	ms := r.metrics
	if r.spec.hang <= 0 || !ms.have || ms.progress.IsZero() {
		return 0
	}
	if d := time.Since(ms.progress); d > r.spec.hang {
		return d
	}
	return 0
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
