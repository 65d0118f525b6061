package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"

	"github.com/shoalhq/shoal/internal/kvhash"
	"github.com/shoalhq/shoal/spec"
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
	"--tokenizer-path", "--chunked-prefill-size", "--log-level", "--api-key", "--dtype", "--quantization",
	"--dp-size", "--ep-size", "--moe-a2a-backend", "--ep-num-redundant-experts", "--deepep-mode", "--moe-runner-backend", "--moe-dense-tp-size",
	"--disaggregation-mode", "--disaggregation-transfer-backend", "--disaggregation-bootstrap-port", "--disaggregation-ib-device",
	"--kv-events-config", "--page-size"}

var sglangBools = []string{"--enable-metrics", "--trust-remote-code", "--disable-radix-cache", "--enable-torch-compile",
	"--disable-cuda-graph", "--skip-server-warmup", "--is-embedding", "--enable-dp-attention", "--enable-eplb",
	"--enable-dp-lm-head", "--enable-two-batch-overlap"}

// SGLang runs `python3 -m sglang.launch_server ARGS`.
func SGLang(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("launch_server.py", sglangValued, sglangBools, map[string]string{"--tp-size": "--tp", "--dp": "--dp-size", "--data-parallel-size": "--dp-size",
		"--expert-parallel-size": "--ep-size", "--ep": "--ep-size"})
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
	if err := parseSGLangParallel(fs, &c); err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	if c.disagg, err = parseSGLDisagg(fs); err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	if err := parseSGLangKVEvents(fs, &c); err != nil {
		fmt.Fprintln(stderr, err)
		return 2
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
	c.argsSig = argsSignature(args, sglangBools, "--node-rank", "--host", "--port", "--api-key", "--enable-metrics", "--log-level", "--kv-events-config")
	return serve(ctx, c, stdout, stderr)
}

// parseSGLangKVEvents reads --kv-events-config as SGLang does (pydantic:
// unknown fields ignored, wrong types refused; events are on with the zmq
// publisher and the radix cache) and --page-size, the tokens per cached
// page: SGLang's default is 1, which the simulator keeps to when events
// are on; without events it keeps its preset's block size (nothing outside
// could tell).
func parseSGLangKVEvents(fs *flagSet, c *serveConfig) error {
	page, err := fs.integer("--page-size", 0)
	if err != nil {
		return err
	}
	if fs.has("--page-size") && page < 1 {
		return fmt.Errorf("ValueError: --page-size must be a positive integer, got %d", page)
	}
	raw := fs.str("--kv-events-config", "")
	if raw == "" {
		c.blockSize = page
		return nil
	}
	k := kvEventsConfig{Endpoint: "tcp://*:5557", BufferSteps: 10_000, HWM: 100_000, MaxQueueSize: 100_000}
	if err := json.Unmarshal([]byte(raw), &k); err != nil {
		return fmt.Errorf("pydantic_core._pydantic_core.ValidationError: 1 validation error for KVEventsConfig: %v", err)
	}
	if k.Publisher == nil || *k.Publisher != "zmq" || fs.boolean("--disable-radix-cache") {
		c.blockSize = page
		return nil
	}
	c.kvEvents, c.hashAlgo, c.blockSize = &k, kvhash.AlgoSGLangPage, max(page, 1)
	return nil
}

// parseSGLangParallel reads SGLang's DP attention and EP flags, refusing
// what SGLang asserts against.
func parseSGLangParallel(fs *flagSet, c *serveConfig) error {
	var err error
	if c.sgDP, err = fs.integer("--dp-size", 1); err != nil {
		return err
	}
	if c.sgEP, err = fs.integer("--ep-size", 1); err != nil {
		return err
	}
	if c.dp.redundant, err = fs.integer("--ep-num-redundant-experts", 0); err != nil {
		return err
	}
	c.dp.eplb = fs.boolean("--enable-eplb")
	a2a := fs.str("--moe-a2a-backend", "none")
	switch {
	case c.sgDP < 1 || c.tp%c.sgDP != 0:
		return fmt.Errorf("AssertionError: tp_size (%d) must be divisible by dp_size (%d)", c.tp, c.sgDP)
	case fs.boolean("--enable-dp-attention") && c.sgDP < 2:
		return fmt.Errorf("ValueError: --enable-dp-attention needs --dp-size > 1, got %d", c.sgDP)
	case c.sgDP > 1 && !fs.boolean("--enable-dp-attention"):
		// Without DP attention --dp-size runs independent replicas behind
		// SGLang's own router, which shoal does not launch.
		return fmt.Errorf("ValueError: --dp-size %d without --enable-dp-attention is SGLang's data-parallel router mode; this simulator models DP attention only", c.sgDP)
	case !slices.Contains(spec.SGLangAll2AllBackends, a2a):
		return fmt.Errorf("launch_server.py: error: argument --moe-a2a-backend: invalid choice: '%s' (choose from %s)", a2a, quoteList(spec.SGLangAll2AllBackends))
	case a2a == "deepep" && c.sgEP != c.tp:
		return fmt.Errorf("AssertionError: DeepEP requires ep_size == tp_size, got ep_size %d and tp_size %d", c.sgEP, c.tp)
	case c.dp.eplb && c.sgEP < 2:
		return fmt.Errorf("ValueError: --enable-eplb needs expert parallelism (--ep-size > 1)")
	}
	return nil
}
