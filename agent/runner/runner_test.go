package runner

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/gossip"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// phases collects the phases a run goes through, as its supervisor sees them
// on each Notify.
type phases struct {
	r    *Runner
	seen []string
}

func (p *phases) notify() {
	if p.r == nil {
		return
	}
	ph := p.r.Status().Phase
	if len(p.seen) == 0 || p.seen[len(p.seen)-1] != ph {
		p.seen = append(p.seen, ph)
	}
}

// newRun builds a runner that is stopped when the test ends, even when it
// fails half-way (no goroutine outlives its synctest bubble).
func newRun(t *testing.T, cfg Config) *Runner {
	r := New(cfg)
	t.Cleanup(func() { r.Stop("test cleanup", time.Second); <-r.Done() })
	return r
}

func stopAndWait(t *testing.T, r *Runner) {
	t.Helper()
	r.Stop("test over", time.Second)
	<-r.Done()
}

func TestHeadSequence(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt, p := &fakeRuntime{}, &fakeProber{}
		cfg := headConfig(rt, p, map[string]*fakeMember{"b": okMember()})
		var pulled []string
		cfg.Downloads = true
		cfg.Weights = func(ctx context.Context, progress func(string)) error {
			progress("50% 1 GiB/s")
			pulled = append(pulled, "pulled")
			return nil
		}
		cfg.RayStop = func(context.Context) { rt.log = append(rt.log, "ray stop --force") }
		ph := &phases{}
		cfg.Notify = ph.notify
		r := newRun(t, cfg)
		ph.r = r
		require.Equal(t, gossip.EngineStarting, r.Status().Phase)
		r.Start()
		synctest.Wait()
		st := r.Status()
		require.Equal(t, gossip.EngineReady, st.Phase)
		require.Empty(t, st.Failed)
		require.Equal(t, []string{"pulled"}, pulled)
		require.Equal(t, []string{gossip.EngineDownloading, gossip.EngineRunning, gossip.EngineLoading, gossip.EngineReady}, ph.seen)
		require.Equal(t, []string{"start ray", "start vllm"}, rt.events(), "the node process first, the server after the GPU gate")
		require.Len(t, st.Records, 2)

		time.Sleep(3 * time.Second) // three supervision rounds
		p.set(func(p *fakeProber) { p.metrics = engine.Metrics{Running: 2, GenerationTokens: 100} })
		time.Sleep(2 * time.Second)
		require.True(t, r.Status().Metrics.Have)
		require.Equal(t, 2.0, r.Status().Metrics.Running)

		stopAndWait(t, r)
		require.Equal(t, []string{"start ray", "start vllm", "stop vllm", "stop ray", "ray stop --force"}, rt.events(),
			"newest first, then Ray's leftovers")
		st = r.Status()
		require.True(t, st.Stopping)
		require.True(t, st.Stopped)
	})
}

func TestGPUGateTimesOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{gpus: func() float64 { return 8 }}
		r := newRun(t, headConfig(rt, &fakeProber{}, nil))
		start := time.Now()
		r.Start()
		synctest.Wait()
		for r.Status().Failed == "" {
			time.Sleep(time.Second)
		}
		require.Contains(t, r.Status().Failed, "ray reported 8 of 16 GPUs within 1m0s")
		require.InDelta(t, time.Minute.Seconds(), time.Since(start).Seconds(), 1)
		require.Equal(t, []string{"start ray"}, rt.events(), "the server never starts before the gate")
		stopAndWait(t, r)
	})
}

func TestStopDuringASlowStartReturnsAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{startDelay: 10 * time.Minute} // an image pull
		r := newRun(t, headConfig(rt, &fakeProber{}, nil))
		r.Start()
		time.Sleep(time.Second)
		asked := time.Now()
		r.Stop("released", 30*time.Second)
		require.Zero(t, time.Since(asked), "Stop never waits")
		<-r.Done()
		require.Less(t, time.Since(asked), time.Second, "the pull is cancelled, not waited for")
		require.Empty(t, rt.events(), "nothing started after the stop")
		require.Empty(t, r.Status().Failed, "a stop is not a failure")
	})
}

func TestDetachLeavesTheEnginesRunning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{}
		r := newRun(t, headConfig(rt, &fakeProber{}, nil))
		r.Start()
		synctest.Wait()
		r.Detach()
		<-r.Done()
		require.Equal(t, []string{"start ray", "start vllm"}, rt.events(), "nothing was stopped")
		require.Len(t, r.Status().Records, 2, "the records stay for the next agent")
		r.Stop("too late", time.Second) // a no-op after Detach
		for _, h := range rt.handles() {
			require.False(t, h.stopped)
		}
	})
}

func TestEngineExitFailsTheRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{}
		r := newRun(t, headConfig(rt, &fakeProber{}, nil))
		r.Start()
		synctest.Wait()
		rt.handles()[1].exit(&engine.ExitError{Code: 1})
		synctest.Wait()
		require.Equal(t, "vllm exited (exit status 1); see /logs/vllm.log", r.Status().Failed)
		stopAndWait(t, r)
	})
}

func TestHungEngineFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProber{metrics: engine.Metrics{Running: 1, GenerationTokens: 10}}
		r := newRun(t, headConfig(&fakeRuntime{}, p, nil))
		r.Start()
		synctest.Wait()
		ready := time.Now()
		for r.Status().Failed == "" {
			time.Sleep(time.Second)
		}
		require.Contains(t, r.Status().Failed, "engine hung: 1m")
		require.InDelta(t, 61, time.Since(ready).Seconds(), 2, "after the hang timeout, not before")
		stopAndWait(t, r)
	})
}

func TestBusyEngineIsNotHung(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProber{}
		r := newRun(t, headConfig(&fakeRuntime{}, p, nil))
		r.Start()
		synctest.Wait()
		for i := 0; i < 180; i++ { // three minutes of generation
			p.set(func(p *fakeProber) { p.metrics = engine.Metrics{Running: 4, GenerationTokens: float64(i * 50)} })
			time.Sleep(time.Second)
		}
		require.Empty(t, r.Status().Failed)
		require.Zero(t, p.canaries, "a busy engine gets no idle canary")
		stopAndWait(t, r)
	})
}

func TestIdleCanary(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProber{}
		r := newRun(t, headConfig(&fakeRuntime{}, p, nil))
		r.Start()
		synctest.Wait()
		time.Sleep(95 * time.Second)
		p.mu.Lock()
		n := p.canaries
		p.mu.Unlock()
		require.Equal(t, 3, n, "an idle engine gets a canary every 30 s")
		p.set(func(p *fakeProber) { p.canaryErr = errors.New("canary POST /v1/completions: 500 EngineDeadError") })
		time.Sleep(31 * time.Second)
		require.Contains(t, r.Status().Failed, "idle canary failed: canary POST /v1/completions: 500 EngineDeadError")
		stopAndWait(t, r)
	})
}

func TestUnhealthyAfterThreeFailedChecks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProber{}
		r := newRun(t, headConfig(&fakeRuntime{}, p, nil))
		r.Start()
		synctest.Wait()
		p.set(func(p *fakeProber) { p.scrapeErr = errors.New("GET /health: 503") })
		time.Sleep(2500 * time.Millisecond)
		require.Empty(t, r.Status().Failed, "two failed checks are tolerated")
		time.Sleep(time.Second)
		require.Equal(t, "engine unhealthy: GET /health: 503", r.Status().Failed)
		stopAndWait(t, r)
	})
}

func TestNeverReadyIsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProber{readyErr: errors.New("GET /health: connection refused")}
		r := newRun(t, headConfig(&fakeRuntime{}, p, nil))
		start := time.Now()
		r.Start()
		for r.Status().Failed == "" {
			time.Sleep(time.Second)
		}
		require.Equal(t, "engine not ready within 1m0s: GET /health: connection refused", r.Status().Failed)
		require.InDelta(t, 60, time.Since(start).Seconds(), 1)
		stopAndWait(t, r)
	})
}

func TestWeightsFailureAndCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{}
		cfg := headConfig(rt, &fakeProber{}, nil)
		cfg.Weights = func(context.Context, func(string)) error { return errors.New("model: shard 3 of 5 is missing") }
		r := newRun(t, cfg)
		r.Start()
		synctest.Wait()
		require.Equal(t, "model: shard 3 of 5 is missing", r.Status().Failed)
		require.Empty(t, rt.events(), "no engine starts on an incomplete model")
		stopAndWait(t, r)

		// A stop during the pull ends it and is no failure.
		cfg.Weights = func(ctx context.Context, _ func(string)) error { <-ctx.Done(); return ctx.Err() }
		cfg.Downloads = true
		r = newRun(t, cfg)
		r.Start()
		synctest.Wait()
		require.Equal(t, gossip.EngineDownloading, r.Status().Phase)
		stopAndWait(t, r)
		require.Empty(t, r.Status().Failed)
	})
}

func TestRuntimeErrorFailsTheRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := headConfig(&fakeRuntime{}, &fakeProber{}, nil)
		cfg.Runtime = func(context.Context) (engine.Runtime, error) {
			return nil, errors.New("containerd socket /run/containerd/containerd.sock: no such file or directory")
		}
		r := newRun(t, cfg)
		r.Start()
		synctest.Wait()
		require.Equal(t, "engine runtime: containerd socket /run/containerd/containerd.sock: no such file or directory", r.Status().Failed)
		stopAndWait(t, r)
	})
}

func TestStartErrorFailsTheRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{startErr: errors.New("exec: \"ray\": executable file not found in $PATH")}
		r := newRun(t, headConfig(rt, &fakeProber{}, nil))
		r.Start()
		synctest.Wait()
		require.Equal(t, "start ray: exec: \"ray\": executable file not found in $PATH", r.Status().Failed)
		stopAndWait(t, r)
	})
}

func TestWorkerWaitsForItsHead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{}
		var up atomic.Bool
		cfg := Config{Group: "g", Epoch: 2, Term: 3, Head: "a", Role: engine.RoleWorker, Plan: &engine.Plan{Role: engine.RoleWorker, Node: engine.Command{Name: "ray"}},
			Runtime: func(context.Context) (engine.Runtime, error) { return rt, nil }, HeadUp: up.Load,
			StartupTimeout: time.Minute, Log: quiet}
		r := newRun(t, cfg)
		r.Start()
		time.Sleep(30 * time.Second)
		require.Empty(t, rt.events(), "no worker before its head's node runs")
		up.Store(true)
		time.Sleep(time.Second)
		require.Equal(t, []string{"start ray"}, rt.events())
		require.Equal(t, gossip.EngineRunning, r.Status().Phase)
		stopAndWait(t, r)

		up.Store(false)
		r = newRun(t, cfg)
		r.Start()
		time.Sleep(61 * time.Second)
		require.Equal(t, "head did not start its engine within 1m0s", r.Status().Failed)
		stopAndWait(t, r)
	})
}

func TestMemberWatch(t *testing.T) {
	cases := []struct {
		name    string
		change  func(m *fakeMember)
		wait    time.Duration
		failed  string
		healthy time.Duration // the run is still healthy this long after the change
	}{
		{"a member's engine failed", func(m *fakeMember) {
			m.set(MemberReport{Group: "g", Epoch: 2, Engine: gossip.EngineFailed, Term: 3, Message: "ray exited"}, nil)
		}, time.Second, "member b engine failed: ray exited", 0},
		{"a failure at an older term is not this run's", func(m *fakeMember) {
			m.set(MemberReport{Group: "g", Epoch: 2, Engine: gossip.EngineFailed, Term: 2}, nil)
		}, 10 * time.Second, "", 0},
		{"a member left the group", func(m *fakeMember) { m.set(MemberReport{Group: "g", Epoch: 3}, nil) },
			time.Second, "member b left the group", 0},
		{"an unanswered member fails the run after its grace", func(m *fakeMember) { m.set(MemberReport{}, errors.New("connection refused")) },
			5 * time.Second, "member b unreachable for 3s: connection refused", 2 * time.Second},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := okMember()
				r := newRun(t, headConfig(&fakeRuntime{}, &fakeProber{}, map[string]*fakeMember{"b": b}))
				r.Start()
				synctest.Wait()
				c.change(b)
				if c.healthy > 0 {
					time.Sleep(c.healthy)
					require.Empty(t, r.Status().Failed)
				}
				time.Sleep(c.wait)
				require.Equal(t, c.failed, r.Status().Failed)
				stopAndWait(t, r)
				require.True(t, b.closed, "the member's connection is closed")
			})
		})
	}
}

func TestMemberAnsweringAgainResetsTheGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := okMember()
		r := newRun(t, headConfig(&fakeRuntime{}, &fakeProber{}, map[string]*fakeMember{"b": b}))
		r.Start()
		synctest.Wait()
		for i := 0; i < 3; i++ { // an agent restart takes 2 s, three times
			b.set(MemberReport{}, errors.New("connection refused"))
			time.Sleep(2 * time.Second)
			b.set(okMember().report, nil)
			time.Sleep(time.Second)
		}
		require.Empty(t, r.Status().Failed)
		stopAndWait(t, r)
	})
}

func TestAdoptedHeadResumesSupervision(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{}
		ray, _ := rt.Start(context.Background(), engine.Command{Name: "ray"})
		vllm, _ := rt.Start(context.Background(), engine.Command{Name: "vllm"})
		r := Adopt(headConfig(rt, &fakeProber{}, nil), rt, []engine.Handle{ray, vllm})
		require.Equal(t, gossip.EngineLoading, r.Status().Phase)
		synctest.Wait()
		require.Equal(t, gossip.EngineReady, r.Status().Phase, "an engine that serves passes the probe at once")
		require.Equal(t, []int{100, 101}, r.Pids())
		vllm.(*fakeHandle).exit(&engine.ExitError{Unknown: true})
		synctest.Wait()
		require.Contains(t, r.Status().Failed, "vllm exited")
		stopAndWait(t, r)
		require.Equal(t, []string{"start ray", "start vllm", "stop vllm", "stop ray"}, rt.events())
	})
}

func TestWorkerWatchesItsHead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		head := &fakeMember{report: MemberReport{Group: "g", Epoch: 2, Engine: gossip.EngineReady, Term: 3}}
		rt := &fakeRuntime{}
		cfg := Config{Group: "g", Epoch: 2, Term: 3, Head: "a", Role: engine.RoleWorker, Plan: &engine.Plan{Role: engine.RoleWorker, Node: engine.Command{Name: "ray"}},
			Runtime: func(context.Context) (engine.Runtime, error) { return rt, nil }, StartupTimeout: time.Minute, Log: quiet,
			Members: []Member{{ID: "a", Addr: "a:7947"}}, Dial: func(string) (MemberClient, error) { return head, nil },
			MemberGrace: func(string) time.Duration { return 3 * time.Second }}
		r := newRun(t, cfg)
		r.Start()
		time.Sleep(10 * time.Second)
		require.Empty(t, r.Status().Failed)
		head.set(MemberReport{}, errors.New("connection refused")) // the head's host died
		time.Sleep(4 * time.Second)
		require.Equal(t, "member a unreachable for 3s: connection refused", r.Status().Failed,
			"a worker sees its head's death within the grace, before gossip does")
		stopAndWait(t, r)
	})
}
