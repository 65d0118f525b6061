package engine

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/shoalhq/shoal/spec"
)

// APIServer is one OpenAI server of a group, as routers address it: with
// hybrid load balancing a node's server fronts its ranks FirstRank ..
// FirstRank+Ranks-1 and takes vLLM's X-data-parallel-rank header to pin
// one (PinRanks); with external load balancing each rank has its own.
type APIServer struct {
	Addr      string
	FirstRank int
	Ranks     int
	PinRanks  bool `json:",omitempty"`
}

// RankHeader is the header vLLM (and SGLang) read to pin a request to a DP
// rank.
const RankHeader = "X-data-parallel-rank"

// dpPlan builds the command lines of a data-parallel group for node rank
// (the head is 0): docs/design/wide-ep.md has them by mode.
func dpPlan(in PlanInput, rank int, env map[string]string, host string) (*Plan, error) {
	s := in.Spec
	e := s.Engine
	dp := e.DataParallel
	if len(in.MemberIPs) != s.Resources.Nodes {
		return nil, fmt.Errorf("plan: a data-parallel group needs every member's address (%d of %d)", len(in.MemberIPs), s.Resources.Nodes)
	}
	if rank < 0 || rank >= s.Resources.Nodes {
		return nil, fmt.Errorf("plan: node rank %d outside a group of %d", rank, s.Resources.Nodes)
	}
	if in.MemberIPs[rank] != in.NodeIP || in.MemberIPs[0] != in.HeadIP {
		return nil, fmt.Errorf("plan: node %s at rank %d, head %s, members %v do not agree", in.NodeIP, rank, in.HeadIP, in.MemberIPs)
	}
	L, rpc := dp.SizePerNode, strconv.Itoa(dp.DPRPCPort(in.Epoch, in.Term))
	start := rank * L
	p := &Plan{Role: in.Role}
	switch e.Kind {
	case spec.EngineVLLM:
		common := []string{"serve", ModelArg(s), "--served-model-name", e.ServedModelName,
			"--tensor-parallel-size", strconv.Itoa(e.TensorParallelSize), "--data-parallel-size", strconv.Itoa(dp.Size)}
		addr := []string{"--data-parallel-address", in.HeadIP, "--data-parallel-rpc-port", rpc}
		tail := vllmTail(s)
		api := func(port int) []string {
			a := []string{"--host", host, "--port", strconv.Itoa(port)}
			if dp.APIServers > 0 {
				a = append(a, "--api-server-count", strconv.Itoa(dp.APIServers))
			}
			return a
		}
		local := []string{"--data-parallel-size-local", strconv.Itoa(L)}
		var cmds []Command
		switch dp.LoadBalancing {
		case spec.LBInternal:
			args := append(append([]string{}, common...), local...)
			if rank > 0 {
				args = append(args, "--data-parallel-start-rank", strconv.Itoa(start))
			}
			args = append(args, addr...)
			if rank == 0 {
				args = append(args, api(e.Port)...)
			} else {
				args = append(args, "--headless")
			}
			cmds = []Command{{Name: "vllm", Path: in.Bin.VLLM, Args: append(args, tail...), Env: envList(env)}}
		case spec.LBHybrid:
			args := append(append(append([]string{}, common...), "--data-parallel-hybrid-lb"), local...)
			args = append(append(append(args, "--data-parallel-start-rank", strconv.Itoa(start)), addr...), api(e.Port)...)
			cmds = []Command{{Name: "vllm", Path: in.Bin.VLLM, Args: append(args, tail...), Env: envList(env)}}
		case spec.LBExternal:
			for j := 0; j < L; j++ {
				args := append(append([]string{}, common...), "--data-parallel-rank", strconv.Itoa(start+j))
				args = append(append(args, addr...), api(e.Port+j)...)
				renv := mergeEnv(env, map[string]string{"CUDA_VISIBLE_DEVICES": rankGPUs(env["CUDA_VISIBLE_DEVICES"], j, e.TensorParallelSize)})
				cmds = append(cmds, Command{Name: "vllm", Path: in.Bin.VLLM, Args: append(args, tail...), Env: envList(renv),
					Log: "vllm-dp" + strconv.Itoa(start+j)})
			}
		default:
			return nil, fmt.Errorf("plan: unknown load balancing %q", dp.LoadBalancing)
		}
		p.Node, p.Extra = cmds[0], cmds[1:]
	case spec.EngineSGLang:
		if dp.LoadBalancing != spec.LBInternal {
			return nil, fmt.Errorf("plan: sglang serves a DP-attention group from rank 0 only (load balancing %q)", dp.LoadBalancing)
		}
		world := strconv.Itoa(e.TensorParallelSize * dp.Size)
		args := []string{"-m", "sglang.launch_server", "--model-path", ModelArg(s), "--served-model-name", e.ServedModelName,
			"--tp", world, "--dp-size", strconv.Itoa(dp.Size), "--enable-dp-attention"}
		args = append(args, epArgs(s)...)
		args = append(args, "--dist-init-addr", net.JoinHostPort(in.HeadIP, rpc), "--nnodes", strconv.Itoa(s.Resources.Nodes),
			"--node-rank", strconv.Itoa(rank), "--host", host, "--port", strconv.Itoa(e.Port), "--enable-metrics")
		args = append(args, sglangDisaggArgs(s, env)...)
		p.Node = Command{Name: "python3", Path: in.Bin.Python, Args: append(args, e.Args...), Env: envList(env)}
	default:
		return nil, fmt.Errorf("plan: engine kind %q has no data parallelism", e.Kind)
	}
	if in.Role == RoleHead {
		p.Endpoint = net.JoinHostPort(in.NodeIP, strconv.Itoa(e.Port))
		p.APIServers = apiServers(s, in.MemberIPs)
		p.setCanary(s)
	}
	return p, nil
}

// apiServers lists the group's OpenAI servers, node by node, for routers.
func apiServers(s *spec.Deployment, ips []string) []APIServer {
	dp, port := s.Engine.DataParallel, s.Engine.Port
	L := dp.SizePerNode
	switch {
	case s.Engine.Kind != spec.EngineVLLM || dp.LoadBalancing == spec.LBInternal:
		return []APIServer{{Addr: net.JoinHostPort(ips[0], strconv.Itoa(port)), FirstRank: 0, Ranks: dp.Size}}
	case dp.LoadBalancing == spec.LBHybrid:
		out := make([]APIServer, 0, len(ips))
		for i, ip := range ips {
			out = append(out, APIServer{Addr: net.JoinHostPort(ip, strconv.Itoa(port)), FirstRank: i * L, Ranks: L, PinRanks: true})
		}
		return out
	default:
		out := make([]APIServer, 0, dp.Size)
		for i, ip := range ips {
			for j := 0; j < L; j++ {
				out = append(out, APIServer{Addr: net.JoinHostPort(ip, strconv.Itoa(port+j)), FirstRank: i*L + j, Ranks: 1})
			}
		}
		return out
	}
}

// epArgs are the expert-parallel flags of the spec's engine kind.
func epArgs(s *spec.Deployment) []string {
	e := s.Engine
	if !e.EPOn() {
		return nil
	}
	ep := e.ExpertParallel
	if e.Kind == spec.EngineSGLang {
		world := e.TensorParallelSize
		if e.DataParallel != nil {
			world *= e.DataParallel.Size
		}
		a := []string{"--ep-size", strconv.Itoa(world)}
		if ep.All2AllBackend != "" {
			a = append(a, "--moe-a2a-backend", ep.All2AllBackend)
		}
		if ep.EPLB != nil {
			a = append(a, "--enable-eplb")
			if ep.EPLB.RedundantExperts > 0 {
				a = append(a, "--ep-num-redundant-experts", strconv.Itoa(ep.EPLB.RedundantExperts))
			}
		}
		return a
	}
	a := []string{"--enable-expert-parallel"}
	if ep.All2AllBackend != "" {
		a = append(a, "--all2all-backend", ep.All2AllBackend)
	}
	if ep.EPLB != nil {
		a = append(a, "--enable-eplb", "--eplb-config", spec.EPLBConfig(ep.EPLB))
	}
	return a
}

// epEnv adds what expert parallelism's all-to-all needs from the host's
// RDMA scan: UCX (NIXL, DeepEP's host side) and NVSHMEM (DeepEP) on the
// HCAs NCCL uses, and NVSHMEM's bootstrap on NCCL's interface.
func epEnv(s *spec.Deployment, env map[string]string) {
	if !s.Engine.EPOn() {
		return
	}
	if hca := rdmaHCAs(env); hca != "" {
		setDefault(s, env, "UCX_NET_DEVICES", hca)
		setDefault(s, env, "NVSHMEM_HCA_LIST", hca)
	}
	setDefault(s, env, "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", env["NCCL_SOCKET_IFNAME"])
}

// rdmaHCAs is the HCA list (mlx5_0:1,…) the RDMA scan gave NCCL, "" when
// NCCL runs over sockets.
func rdmaHCAs(env map[string]string) string {
	if env["NCCL_IB_DISABLE"] == "1" {
		return ""
	}
	return env["NCCL_IB_HCA"]
}

// setDefault sets key unless the spec's env (already merged into env, and
// winning) names it, or v is empty.
func setDefault(s *spec.Deployment, env map[string]string, key, v string) {
	if _, ok := s.Engine.Env[key]; !ok && v != "" {
		env[key] = v
	}
}

// vllmTail is what every vLLM command line of the spec ends with: the EP
// and KV-transfer flags, then the user's engine.args.
func vllmTail(s *spec.Deployment) []string {
	return append(append(append(epArgs(s), kvTransferArgs(s)...), loraArgs(s)...), s.Engine.Args...)
}

// loraArgs are the flags of engine.lora: the engine starts with LoRA slots
// (docs/design/adapters.md §A1).
func loraArgs(s *spec.Deployment) []string {
	l := s.Engine.LoRA
	if l == nil {
		return nil
	}
	return []string{"--enable-lora", "--max-loras", strconv.Itoa(l.MaxLoras), "--max-lora-rank", strconv.Itoa(l.MaxLoraRank),
		"--max-cpu-loras", strconv.Itoa(l.MaxCPULoras)}
}

// LoRAEnv is what vLLM's API server needs to load adapters while it runs
// (without it /v1/load_lora_adapter is not served).
const LoRAEnv = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

func loraEnv(s *spec.Deployment, env map[string]string) {
	if s.Engine.LoRA != nil {
		env[LoRAEnv] = "True"
	}
}

// rankGPUs is the CUDA_VISIBLE_DEVICES of local rank j of tp GPUs: its
// slice of the agent's own list (GPU UUIDs) when it has one, else indices.
func rankGPUs(visible string, j, tp int) string {
	var ids []string
	if visible != "" {
		all := strings.Split(visible, ",")
		if (j+1)*tp <= len(all) {
			ids = all[j*tp : (j+1)*tp]
		}
	}
	if ids == nil {
		for g := j * tp; g < (j+1)*tp; g++ {
			ids = append(ids, strconv.Itoa(g))
		}
	}
	return strings.Join(ids, ",")
}
