package agent

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strconv"
	"time"

	"github.com/shoalhq/shoal/agent/runner"
	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/shoalhq/shoal/nodesource/slurm"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	"github.com/shoalhq/shoal/spec"
)

// newRun plans this node's engine for role (no I/O: the plan is computed
// from the spec, the host's inventory and the head's IP) and builds, but
// does not start, its runner. Loop only.
func (a *Agent) newRun(as *Assignment, role engine.Role, head string, term uint64, headIP string) (*activeRun, error) {
	env := map[string]string{} // derived from RDMA, the agent's engine_env applied; the spec's env wins in the plan
	for k, v := range a.hw.NCCLEnv {
		env[k] = v
	}
	if a.hw.Visible != "" {
		env["CUDA_VISIBLE_DEVICES"] = a.hw.Visible // this agent owns a subset of the host's GPUs
	}
	mj, err := a.modelFor(as.Spec)
	if err != nil {
		return nil, fmt.Errorf("cannot resolve model: %w", err)
	}
	sp := *spec.ShiftPorts(as.Spec, a.cfg.PortBand*slurm.PortBandWidth)
	if mj != nil {
		sp.Model.Path = mj.dir // the engine reads the weights where this host keeps them
	}
	kind := sp.Engine.Runtime
	if kind == "" {
		kind = "process"
	}
	bin := engine.Binaries{Ray: a.cfg.RayBin, VLLM: a.cfg.VLLMBin, Python: a.cfg.PythonBin}
	if kind == "containerd" {
		bin = engine.Binaries{Ray: "ray", VLLM: "vllm", Python: "python3"} // on the image's PATH
	}
	in := engine.PlanInput{Spec: &sp, Role: role, NodeIP: a.cfg.Address, HeadIP: headIP, BindHost: a.cfg.EngineHost, Env: env, Bin: bin,
		Epoch: as.Epoch, Term: term, MemberIPs: memberIPs(as, head, headIP), PortOffset: a.cfg.PortBand * slurm.PortBandWidth}
	var plan *engine.Plan
	switch as.Spec.Engine.Kind {
	case spec.EngineCommand:
		plan, err = engine.CommandPlan(in, runRank(as, head, a.cfg.NodeID))
	case spec.EngineVLLM, spec.EngineSGLang:
		plan, err = engine.NativePlan(in, runRank(as, head, a.cfg.NodeID))
	default:
		plan, err = engine.RayVLLM(in)
	}
	if err == nil && kind == "containerd" {
		err = containerize(plan, &sp, map[string]string{"io.shoal.group": as.Group,
			"io.shoal.epoch": strconv.FormatUint(as.Epoch, 10), "io.shoal.term": strconv.FormatUint(term, 10), "io.shoal.role": string(role)})
	}
	if err != nil {
		return nil, fmt.Errorf("cannot plan engine: %w", err)
	}
	info := RunInfo{Group: as.Group, Epoch: as.Epoch, Term: term, Head: head, Role: role}
	cfg := a.runnerConfig(as, info, plan, kind)
	if mj != nil {
		cfg.Weights, cfg.Downloads = a.weightsFunc(mj, cfg.StartupTimeout), mj.remote
	}
	return &activeRun{r: runner.New(cfg), info: info, plan: plan, kind: kind}, nil
}

// runnerConfig is everything a runner needs but the weights.
func (a *Agent) runnerConfig(as *Assignment, i RunInfo, plan *engine.Plan, kind string) runner.Config {
	timeout := time.Duration(as.Spec.Engine.StartupTimeoutSeconds) * time.Second
	cfg := runner.Config{Group: i.Group, Epoch: i.Epoch, Term: i.Term, Head: i.Head, Role: i.Role, Plan: plan,
		Runtime:        func(ctx context.Context) (engine.Runtime, error) { return a.rts.get(ctx, kind) },
		StartupTimeout: timeout, HangTimeout: a.cfg.HangTimeout, CanaryInterval: a.cfg.CanaryInterval,
		Notify: a.poke,
		Log:    a.log.With("group", i.Group, "epoch", i.Epoch, "term", i.Term, "role", string(i.Role))}
	if plan.RayStop && kind == "process" {
		cfg.RayStop = func(ctx context.Context) { a.rayStopForce(ctx, plan) }
	}
	switch i.Role {
	case engine.RoleHead:
		cfg.Prober = a.prober("http://"+plan.Endpoint, as.Spec.Engine.ServedModelName, plan.CanaryEndpoint(), plan.CanaryFields)
		if len(plan.APIServers) > 1 {
			g := runner.GroupProber{Servers: plan.APIServers}
			for _, s := range plan.APIServers {
				g.Probers = append(g.Probers, a.prober("http://"+s.Addr, as.Spec.Engine.ServedModelName, plan.CanaryEndpoint(), plan.CanaryFields))
			}
			cfg.Prober = g
		}
		if k := plan.KVEvents; k != nil {
			cfg.KVSubscribe = func(ctx context.Context, h kvevents.Handler) error { return a.kvSubscribe(ctx, k, h) }
		}
		for _, m := range as.Members {
			if m.NodeID != a.cfg.NodeID {
				cfg.Members = append(cfg.Members, runner.Member{ID: m.NodeID, Addr: m.GRPC})
			}
		}
	default:
		head, term := i.Head, i.Term
		cfg.HeadUp = func() bool {
			t, ok := a.mem.Member(head)
			return ok && t.HeadTerm == term && headUp(t.Engine)
		}
		// A worker polls its head as the head polls it: a dead head host is
		// seen in MemberGrace, before gossip's failure detector (and the
		// coordinator hears of it from this member's failed tag).
		for _, m := range as.Members {
			if m.NodeID == head {
				cfg.Members = []runner.Member{{ID: m.NodeID, Addr: m.GRPC}}
			}
		}
	}
	cfg.Dial = a.dial
	cfg.MemberGrace = a.memberGrace
	return cfg
}

// memberGrace is how long a head waits for a member's agent that stopped
// answering: MemberGrace, or restartGrace for one that said it restarts
// with its engine running.
func (a *Agent) memberGrace(id string) time.Duration {
	if t, ok := a.mem.Member(id); ok && t.Restarting {
		return restartGrace
	}
	return a.cfg.MemberGrace
}

// runRank numbers the members for a rank-based program: the elected head is
// rank 0 (the rendezvous lives there), the others follow in assignment order.
func runRank(as *Assignment, head, self string) int {
	if self == head {
		return 0
	}
	members := append([]Member(nil), as.Members...)
	sort.Slice(members, func(i, j int) bool { return members[i].Rank < members[j].Rank })
	r := 1
	for _, m := range members {
		if m.NodeID == head {
			continue
		}
		if m.NodeID == self {
			return r
		}
		r++
	}
	return r
}

// memberIPs are the members' node IPs by run rank (the head's first), from
// their gRPC addresses; nil when one cannot be read.
func memberIPs(as *Assignment, head, headIP string) []string {
	ips := make([]string, len(as.Members))
	for _, m := range as.Members {
		r := runRank(as, head, m.NodeID)
		h, _, err := net.SplitHostPort(m.GRPC)
		if err != nil || r < 0 || r >= len(ips) {
			return nil
		}
		ips[r] = h
	}
	if len(ips) > 0 && ips[0] != headIP {
		ips[0] = headIP // the head as the group elected it
	}
	return ips
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

// memberClient is a member's Agent API, as a head polls it.
type memberClient struct {
	close func() error
	c     agentv1.AgentClient
}

func (a *Agent) dialMember(addr string) (runner.MemberClient, error) {
	conn, err := a.cfg.TLS.Dial(addr)
	if err != nil {
		return nil, err
	}
	return memberClient{close: conn.Close, c: agentv1.NewAgentClient(conn)}, nil
}

func (m memberClient) Close() error { return m.close() }

func (m memberClient) Status(ctx context.Context) (runner.MemberReport, error) {
	st, err := m.c.Status(ctx, &agentv1.StatusRequest{Brief: true})
	if err != nil {
		return runner.MemberReport{}, err
	}
	return runner.MemberReport{Group: st.GetAssignment().GetGroupId(), Epoch: st.GetAssignment().GetEpoch(),
		Engine: st.GetEngineState(), Term: st.GetTerm(), Message: st.GetMessage()}, nil
}
