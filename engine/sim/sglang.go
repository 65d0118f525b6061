package sim

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
)

// sglangNames maps vLLM metric names to SGLang's (docs/design/engines.md
// §A3). vLLM series SGLang does not have are kept off its /metrics.
var sglangNames = map[string]string{
	"vllm:num_requests_running":        "sglang:num_running_reqs",
	"vllm:num_requests_waiting":        "sglang:num_queue_reqs",
	"vllm:kv_cache_usage_perc":         "sglang:token_usage",
	"vllm:prompt_tokens":               "sglang:prompt_tokens",
	"vllm:generation_tokens":           "sglang:generation_tokens",
	"vllm:time_to_first_token_seconds": "sglang:time_to_first_token_seconds",
	"vllm:e2e_request_latency_seconds": "sglang:e2e_request_latency_seconds",
	"vllm:inter_token_latency_seconds": "sglang:inter_token_latency_seconds",
}

var sglangValued = []string{"--model-path", "--served-model-name", "--tp", "--tp-size", "--pp-size", "--dp", "--dist-init-addr",
	"--nnodes", "--node-rank", "--host", "--port", "--context-length", "--mem-fraction-static", "--max-running-requests",
	"--tokenizer-path", "--chunked-prefill-size", "--log-level", "--api-key", "--dtype", "--quantization"}

var sglangBools = []string{"--enable-metrics", "--trust-remote-code", "--disable-radix-cache", "--enable-torch-compile",
	"--disable-cuda-graph", "--skip-server-warmup", "--is-embedding"}

// SGLang runs `python3 -m sglang.launch_server ARGS`.
func SGLang(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("launch_server.py", sglangValued, sglangBools, map[string]string{"--tp-size": "--tp"})
	if err := fs.parse(args); err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	if !fs.has("--model-path") {
		fmt.Fprintln(stderr, "launch_server.py: error: the following arguments are required: --model-path")
		return 2
	}
	c := serveConfig{flavor: "sglang", model: fs.str("--model-path", ""), host: fs.str("--host", "127.0.0.1"),
		enableMetrics: fs.boolean("--enable-metrics"), pooling: fs.boolean("--is-embedding")}
	c.served = fs.str("--served-model-name", c.model)
	var err error
	for _, x := range []struct {
		p    *int
		name string
		def  int
	}{{&c.port, "--port", 30000}, {&c.tp, "--tp", 1}, {&c.pp, "--pp-size", 1}, {&c.nnodes, "--nnodes", 1},
		{&c.nodeRank, "--node-rank", 0}, {&c.maxModelLen, "--context-length", 32768}, {&c.maxNumSeqs, "--max-running-requests", 256}} {
		if *x.p, err = fs.integer(x.name, x.def); err != nil {
			fmt.Fprintln(stderr, err)
			return 2
		}
	}
	if c.nnodes > 1 {
		dia := fs.str("--dist-init-addr", "")
		host, port, err := net.SplitHostPort(dia)
		if err != nil {
			fmt.Fprintf(stderr, "ValueError: --dist-init-addr %q must be host:port when --nnodes > 1\n", dia)
			return 2
		}
		c.masterAddr = host
		c.masterPort, _ = strconv.Atoi(port)
		// Only rank 0 serves HTTP.
		c.headless = c.nodeRank > 0
	} else {
		c.masterAddr, c.masterPort = "127.0.0.1", 0
	}
	c.argsSig = argsSignature(args, sglangBools, "--node-rank", "--host", "--port", "--api-key", "--enable-metrics", "--log-level")
	return serve(ctx, c, stdout, stderr)
}
