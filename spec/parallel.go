package spec

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// parallelFlags are engine flags the launch plan sets from
// engine.dataParallel and engine.expertParallel once either is given.
var parallelFlags = []string{"--data-parallel-size", "-dp", "--data-parallel-size-local", "-dpl", "--data-parallel-address", "-dpa",
	"--data-parallel-rpc-port", "-dpp", "--data-parallel-start-rank", "-dpr", "--data-parallel-rank", "--data-parallel-hybrid-lb",
	"--data-parallel-external-lb", "--headless", "--api-server-count", "--enable-expert-parallel", "--all2all-backend",
	"--enable-eplb", "--eplb-config", "--nnodes", "--node-rank",
	// SGLang
	"--dp-size", "--dp", "--enable-dp-attention", "--ep-size", "--moe-a2a-backend", "--ep-num-redundant-experts", "--dist-init-addr"}

// validateParallel checks engine.dataParallel and engine.expertParallel
// against the engine kind, the group's GPUs and the other ports, naming
// the field and showing the arithmetic.
func validateParallel(d *Deployment) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	e, r := &d.Engine, d.Resources
	moe := e.Kind == EngineVLLM || e.Kind == EngineSGLang
	if dp := e.DataParallel; dp != nil && !moe {
		bad("engine.dataParallel", "needs engine.kind %s or %s, got %s (shoal launches vLLM's data parallelism with its own multiprocessing launcher, not through Ray)",
			EngineVLLM, EngineSGLang, e.Kind)
	}
	if ep := e.ExpertParallel; ep != nil && e.Kind == EngineCommand {
		bad("engine.expertParallel", "needs a MoE-capable engine kind (%s, %s or %s); kind %s has no expert parallelism shoal can turn on: pass the program's own flags in engine.command",
			EngineRayVLLM, EngineVLLM, EngineSGLang, e.Kind)
	}
	errs = append(errs, refuseOwned(e.Args, parallelFlags, "engine.dataParallel and engine.expertParallel")...)
	gpus := r.Nodes * r.GPUsPerNode
	if dp := e.DataParallel; dp != nil {
		switch {
		case dp.Size < 1:
			bad("engine.dataParallel.size", "must be at least 1, got %d", dp.Size)
		case e.TensorParallelSize >= 1 && gpus >= 1 && dp.Size*e.TensorParallelSize != gpus:
			bad("engine.dataParallel.size", "dataParallel.size × tensorParallelSize (%d × %d = %d) must equal resources.nodes × resources.gpusPerNode (%d × %d = %d)",
				dp.Size, e.TensorParallelSize, dp.Size*e.TensorParallelSize, r.Nodes, r.GPUsPerNode, gpus)
		case dp.SizePerNode < 1:
			bad("engine.dataParallel.sizePerNode", "must be at least 1 (unset: size / resources.nodes, which is %d / %d)", dp.Size, r.Nodes)
		case dp.Size%dp.SizePerNode != 0:
			bad("engine.dataParallel.sizePerNode", "%d does not divide dataParallel.size (%d)", dp.SizePerNode, dp.Size)
		case dp.Size/dp.SizePerNode != r.Nodes:
			bad("engine.dataParallel.sizePerNode", "dataParallel.size / sizePerNode (%d / %d = %d nodes) must equal resources.nodes (%d)",
				dp.Size, dp.SizePerNode, dp.Size/dp.SizePerNode, r.Nodes)
		case dp.SizePerNode*e.TensorParallelSize != r.GPUsPerNode:
			bad("engine.dataParallel.sizePerNode", "sizePerNode × tensorParallelSize (%d × %d = %d) must equal resources.gpusPerNode (%d): a rank's tensor parallelism stays within a node",
				dp.SizePerNode, e.TensorParallelSize, dp.SizePerNode*e.TensorParallelSize, r.GPUsPerNode)
		}
		if e.PipelineParallelSize != 1 {
			bad("engine.pipelineParallelSize", "must be 1 with engine.dataParallel, got %d", e.PipelineParallelSize)
		}
		switch dp.LoadBalancing {
		case LBInternal:
		case LBHybrid, LBExternal:
			if e.Kind == EngineSGLang {
				bad("engine.dataParallel.loadBalancing", "%s is vLLM's; SGLang serves a DP-attention group from node rank 0 only: use %s", dp.LoadBalancing, LBInternal)
			}
		default:
			bad("engine.dataParallel.loadBalancing", "unknown mode %q; one of %s, %s, %s", dp.LoadBalancing, LBInternal, LBHybrid, LBExternal)
		}
		switch {
		case dp.APIServers < 0 || dp.APIServers > 64:
			bad("engine.dataParallel.apiServers", "must be 1 to 64, got %d", dp.APIServers)
		case dp.APIServers > 0 && e.Kind == EngineSGLang:
			bad("engine.dataParallel.apiServers", "is vLLM's --api-server-count; SGLang has one HTTP server")
		case dp.APIServers > 0 && dp.LoadBalancing == LBExternal:
			bad("engine.dataParallel.apiServers", "is for internal and hybrid load balancing; external runs one API server per rank")
		}
		if dp.RPCPort < 1 || dp.RPCPort+DPPortWindow-1 > 65535 {
			bad("engine.dataParallel.rpcPort", "must be a TCP port 1-%d (the group uses it and the next %d, one per epoch), got %d", 65535-DPPortWindow+1, DPPortWindow-1, dp.RPCPort)
		} else if dp.SizePerNode >= 1 {
			api0, api1 := e.Port, e.Port+dp.APIPorts()-1
			rpc0, rpc1 := dp.RPCPort, dp.RPCPort+DPPortWindow-1
			if api1 > 65535 {
				bad("engine.port", "the API servers need ports %d-%d (one per rank on a node with external load balancing); lower engine.port", api0, api1)
			}
			if api0 <= rpc1 && rpc0 <= api1 {
				bad("engine.dataParallel.rpcPort", "ports %d-%d (one per epoch) clash with the API servers' %d-%d (engine.port, one per local rank with external load balancing)",
					rpc0, rpc1, api0, api1)
			}
			if m := e.MasterPort; rpc0 <= m && m <= rpc1 {
				bad("engine.dataParallel.rpcPort", "ports %d-%d (one per epoch) include engine.masterPort (%d)", rpc0, rpc1, m)
			}
			if m := e.MasterPort; api0 <= m && m <= api1 && api1 > api0 {
				bad("engine.port", "the API servers' ports %d-%d include engine.masterPort (%d)", api0, api1, m)
			}
		}
	}
	if ep := e.ExpertParallel; ep != nil {
		if !ep.Enabled && (ep.All2AllBackend != "" || ep.EPLB != nil) {
			bad("engine.expertParallel.enabled", "is false but all2allBackend or eplb is set; set enabled: true")
		}
		if b := ep.All2AllBackend; b != "" {
			choices := VLLMAll2AllBackends
			if e.Kind == EngineSGLang {
				choices = SGLangAll2AllBackends
			}
			if e.Kind != EngineCommand && !slices.Contains(choices, b) {
				bad("engine.expertParallel.all2allBackend", "unknown backend %q for %s; one of %s", b, e.Kind, strings.Join(choices, ", "))
			}
		}
		if l := ep.EPLB; l != nil {
			for _, f := range []struct {
				name string
				v    int
			}{{"windowSize", l.WindowSize}, {"stepInterval", l.StepInterval}, {"redundantExperts", l.RedundantExperts}} {
				if f.v < 0 || f.v > 1<<20 {
					bad("engine.expertParallel.eplb."+f.name, "must be 0 to %d, got %d", 1<<20, f.v)
				}
			}
		}
	}
	if e.DataParallel == nil && e.ExpertParallel != nil && e.Kind != EngineCommand && e.TensorParallelSize >= 1 && e.PipelineParallelSize >= 1 &&
		r.Nodes >= 1 && r.GPUsPerNode >= 1 && e.TensorParallelSize*e.PipelineParallelSize != gpus {
		bad("engine.tensorParallelSize", "tensorParallelSize × pipelineParallelSize (%d × %d) must equal resources.nodes × resources.gpusPerNode (%d × %d)",
			e.TensorParallelSize, e.PipelineParallelSize, r.Nodes, r.GPUsPerNode)
	}
	return errs
}

// EPLBConfig is vLLM's --eplb-config JSON for l ("{}" for the defaults).
func EPLBConfig(l *EPLB) string {
	b, _ := json.Marshal(l)
	return string(b)
}
