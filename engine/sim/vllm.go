package sim

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// PGWaitTimeout is vLLM's placement-group wait (ray_utils.py PG_WAIT_TIMEOUT).
const PGWaitTimeout = 1800 * time.Second

// serveConfig is what `vllm serve` was asked for.
type serveConfig struct {
	model, served, host string
	port, tp, pp        int
	backend             string
	nnodes, nodeRank    int
	headless            bool
	masterAddr          string
	masterPort          int
	argsSig             string
	maxModelLen         int
	maxNumSeqs          int
	shutdownTimeout     int
	v0Metrics           bool
	flavor              string // "" (vLLM) or "sglang"
	enableMetrics       bool   // SGLang serves /metrics only with --enable-metrics
	// pooling: a pooling model (vLLM --runner pooling, --task embed,
	// --convert embed; SGLang --is-embedding) serves embeddings and refuses
	// completions and chat, as vLLM does.
	pooling bool
	// autoToolChoice and toolParser: --enable-auto-tool-choice and
	// --tool-call-parser, without which tool_choice "auto" is refused.
	autoToolChoice bool
	toolParser     string
	// kvEvents is --kv-events-config when it turns events on; hashAlgo is
	// --prefix-caching-hash-algo; blockSize is --block-size (0: the preset's).
	kvEvents  *kvEventsConfig
	hashAlgo  string
	blockSize int
	// Data and expert parallelism (docs/design/wide-ep.md); sgDP and sgEP
	// are SGLang's --dp-size and --ep-size.
	dp         dpConfig
	sgDP, sgEP int
	// kvTransfer is --kv-transfer-config (prefill/decode disaggregation);
	// disagg is SGLang's --disaggregation-*.
	kvTransfer *kvTransferConfig
	disagg     *sglDisaggConfig
	// lora is --enable-lora and its limits (lora.go).
	lora loraConfig
}

// dpConfig is what a process was asked for of data and expert parallelism.
type dpConfig struct {
	size, local, start int
	rank               int // --data-parallel-rank (external load balancing); -1 unset
	addr               string
	rpcPort            int
	hybrid, external   bool
	apiServers         int
	ep, eplb           bool
	a2a                string
	redundant          int // EPLB's redundant experts
}

// on says whether the process is one of several DP processes.
func (d dpConfig) on() bool { return d.size > 1 }

// procs is the number of processes of the DP group, and index this one's.
func (d dpConfig) procs() (n, index int) {
	if d.external {
		return d.size, d.rank
	}
	return d.size / d.local, d.start / d.local
}

var vllmValued = []string{"--served-model-name", "--host", "--port", "--tensor-parallel-size", "--pipeline-parallel-size",
	"--distributed-executor-backend", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
	"--gpu-memory-utilization", "--uvicorn-log-level", "--shutdown-timeout", "--nnodes", "--node-rank",
	"--master-addr", "--master-port", "--dtype", "--kv-cache-dtype", "--quantization", "--seed",
	"--block-size", "--swap-space", "--download-dir", "--tokenizer", "--revision", "--api-key",
	"--show-hidden-metrics-for-version", "--data-parallel-size", "--max-log-len", "--generation-config", "--load-format",
	"--runner", "--task", "--convert", "--tool-call-parser", "--allowed-origins", "--allowed-methods", "--allowed-headers",
	"--kv-events-config", "--prefix-caching-hash-algo", "--data-parallel-size-local", "--data-parallel-address",
	"--data-parallel-rpc-port", "--data-parallel-start-rank", "--data-parallel-rank", "--api-server-count", "--all2all-backend",
	"--eplb-config", "--kv-transfer-config", "--max-loras", "--max-lora-rank", "--max-cpu-loras"}

var vllmBools = []string{"--trust-remote-code", "--enforce-eager", "--headless", "--enable-prefix-caching",
	"--no-enable-prefix-caching", "--enable-chunked-prefill", "--disable-log-requests", "--disable-log-stats",
	"--enable-server-load-tracking", "--enable-force-include-usage", "--enable-auto-tool-choice", "--allow-credentials",
	"--data-parallel-hybrid-lb", "--data-parallel-external-lb", "--enable-expert-parallel", "--enable-eplb", "--enable-lora"}

// VLLM runs the `vllm` personality.
func VLLM(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "serve" {
		if len(args) > 0 && (args[0] == "--version" || args[0] == "-v") {
			fmt.Fprintln(stdout, simVersion)
			return 0
		}
		fmt.Fprintln(stderr, "usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...")
		return 2
	}
	cfg, err := parseServe(args[1:])
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	return serve(ctx, cfg, stdout, stderr)
}

const simVersion = "0.11.0"

// toolParsers are vLLM's registered --tool-call-parser names.
var toolParsers = []string{"deepseek_v3", "deepseek_v31", "glm45", "granite", "granite-20b-fc", "hermes", "hunyuan_a13b",
	"internlm", "jamba", "kimi_k2", "llama3_json", "llama4_json", "llama4_pythonic", "minimax", "mistral", "openai",
	"phi4_mini_json", "pythonic", "qwen3_coder", "seed_oss", "step3", "xlam"}

func parseServe(args []string) (serveConfig, error) {
	fs := newFlagSet("vllm serve", vllmValued, vllmBools, map[string]string{"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size",
		"-dp": "--data-parallel-size", "-dpl": "--data-parallel-size-local", "-dpa": "--data-parallel-address", "-dpp": "--data-parallel-rpc-port"})
	if err := fs.parse(args); err != nil {
		return serveConfig{}, err
	}
	if len(fs.pos) != 1 {
		return serveConfig{}, fmt.Errorf("vllm serve: error: expected exactly one model_tag argument, got %d", len(fs.pos))
	}
	c := serveConfig{model: fs.pos[0], served: fs.str("--served-model-name", fs.pos[0]), host: fs.str("--host", "0.0.0.0"),
		backend: fs.str("--distributed-executor-backend", ""), headless: fs.boolean("--headless"),
		v0Metrics: fs.str("--show-hidden-metrics-for-version", "") == "0.10" || os.Getenv("SHOAL_SIM_V0_METRICS") == "1"}
	var err error
	for _, x := range []struct {
		p    *int
		name string
		def  int
	}{{&c.port, "--port", 8000}, {&c.tp, "--tensor-parallel-size", 1}, {&c.pp, "--pipeline-parallel-size", 1},
		{&c.nnodes, "--nnodes", 1}, {&c.nodeRank, "--node-rank", 0}, {&c.maxModelLen, "--max-model-len", 32768},
		{&c.maxNumSeqs, "--max-num-seqs", 256}, {&c.shutdownTimeout, "--shutdown-timeout", 0}, {&c.masterPort, "--master-port", 29501}} {
		if *x.p, err = fs.integer(x.name, x.def); err != nil {
			return c, err
		}
	}
	c.masterAddr = fs.str("--master-addr", "127.0.0.1")
	// Flags only the serving rank acts on (its API server, its scheduler's KV
	// events) do not have to match across ranks; the rest must.
	c.argsSig = argsSignature(args, vllmBools, "--node-rank", "--headless", "--host", "--port", "--api-key", "--uvicorn-log-level",
		"--kv-events-config", "--prefix-caching-hash-algo", "--data-parallel-start-rank", "--data-parallel-rank", "--api-server-count")
	if c.dp, err = parseDP(fs, c); err != nil {
		return c, err
	}
	if c.kvTransfer, err = parseKVTransfer(fs.str("--kv-transfer-config", "")); err != nil {
		return c, err
	}
	if c.lora, err = parseLoRA(fs); err != nil {
		return c, err
	}
	switch c.backend {
	case "", "ray", "mp", "uni", "external_launcher":
	default:
		return c, fmt.Errorf("vllm serve: error: argument --distributed-executor-backend: invalid choice: '%s' (choose from 'ray', 'mp', 'uni', 'external_launcher')", c.backend)
	}
	if c.kvEvents, err = parseKVEvents(fs.str("--kv-events-config", "")); err != nil {
		return c, err
	}
	if c.hashAlgo = fs.str("--prefix-caching-hash-algo", "sha256"); !validHashAlgo(c.hashAlgo) {
		return c, fmt.Errorf("vllm serve: error: argument --prefix-caching-hash-algo: invalid choice: '%s' (choose from %s)", c.hashAlgo, quoteList(hashAlgos))
	}
	if c.blockSize, err = fs.integer("--block-size", 0); err != nil {
		return c, err
	}
	if c.blockSize != 0 && (c.blockSize < 1 || c.blockSize&(c.blockSize-1) != 0) {
		return c, fmt.Errorf("vllm serve: error: argument --block-size: invalid choice: %d (a power of two)", c.blockSize)
	}
	c.autoToolChoice, c.toolParser = fs.boolean("--enable-auto-tool-choice"), fs.str("--tool-call-parser", "")
	if c.autoToolChoice && c.toolParser == "" {
		return c, fmt.Errorf("TypeError: Error: --enable-auto-tool-choice requires --tool-call-parser")
	}
	if c.toolParser != "" && !slices.Contains(toolParsers, c.toolParser) {
		return c, fmt.Errorf("KeyError: invalid tool call parser: %s (chose from { %s })", c.toolParser, strings.Join(toolParsers, ","))
	}
	switch r := fs.str("--runner", "auto"); r {
	case "auto", "generate":
	case "pooling":
		c.pooling = true
	default:
		return c, fmt.Errorf("vllm serve: error: argument --runner: invalid choice: '%s' (choose from 'auto', 'generate', 'pooling')", r)
	}
	switch task := fs.str("--task", "auto"); task {
	case "auto", "generate":
	case "embed", "embedding", "classify", "score", "reward":
		c.pooling = true
	default:
		return c, fmt.Errorf("vllm serve: error: argument --task: invalid choice: '%s' (choose from 'auto', 'generate', 'embed', 'classify', 'score', 'reward')", task)
	}
	switch cv := fs.str("--convert", "auto"); cv {
	case "auto", "none":
	case "embed", "classify", "reward":
		c.pooling = true
	default:
		return c, fmt.Errorf("vllm serve: error: argument --convert: invalid choice: '%s' (choose from 'auto', 'none', 'embed', 'classify', 'reward')", cv)
	}
	return c, nil
}

func logf(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "INFO %s [shoal-sim] "+format+"\n", append([]any{time.Now().Format("01-02 15:04:05")}, args...)...)
}

func serve(ctx context.Context, c serveConfig, stdout, stderr io.Writer) int {
	clock := ClockFromEnv()
	world := c.tp * c.pp
	local := envInt("SHOAL_SIM_GPUS", 8)
	if world > local && c.backend != "ray" && c.nnodes <= 1 {
		fmt.Fprintf(stderr, "ValueError: World size (%d) is larger than the number of available GPUs (%d) in this node. "+
			"If this is intentional and you are using:\n- ray, set '--distributed-executor-backend ray'.\n"+
			"- multiprocessing, set '--nnodes' appropriately.\n", world, local)
		return 1
	}
	if c.nnodes > 1 && c.backend == "ray" {
		fmt.Fprintln(stderr, "ValueError: nnodes > 1 can only be used with the multiprocessing ('mp') distributed executor backend.")
		return 1
	}
	if c.nnodes > 1 {
		if world%c.nnodes != 0 || world/c.nnodes > local {
			fmt.Fprintf(stderr, "ValueError: world size %d over %d nodes needs %d GPUs per node; this node has %d.\n", world, c.nnodes, (world+c.nnodes-1)/c.nnodes, local)
			return 1
		}
		if c.nodeRank < 0 || c.nodeRank >= c.nnodes {
			fmt.Fprintf(stderr, "ValueError: node_rank %d must be in [0, %d).\n", c.nodeRank, c.nnodes)
			return 1
		}
		if c.nodeRank > 0 && !c.headless && c.flavor == "" {
			fmt.Fprintln(stderr, "ValueError: node_rank > 0 runs no API server; add --headless.")
			return 1
		}
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT)
	defer stop()
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	defer signal.Stop(term)

	logf(stdout, "vLLM API server version %s", simVersion)
	logf(stdout, "non-default args: model=%q served_model_name=%q tensor_parallel_size=%d pipeline_parallel_size=%d distributed_executor_backend=%q",
		c.model, c.served, c.tp, c.pp, c.backend)
	var lost, dpLost <-chan string
	master := net.JoinHostPort(c.masterAddr, strconv.Itoa(c.masterPort))
	if c.dp.on() {
		if err := checkDPWorld(c, world, local); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if c.headless {
			// A headless node's engine cores join the DP coordinator on the head.
			_, c.nodeRank = c.dp.procs()
			return serveHeadless(ctx, c, net.JoinHostPort(c.dp.addr, strconv.Itoa(c.dp.rpcPort)), stdout, stderr, term)
		}
		l, agree, err := dpRendezvous(ctx, c, stdout)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if !agree {
			select { // mismatched arguments: the DP handshake never completes
			case <-ctx.Done():
				return 1
			case <-term:
				return 0
			}
		}
		dpLost = l
	}
	if c.headless {
		return serveHeadless(ctx, c, master, stdout, stderr, term)
	}
	if c.nnodes > 1 {
		logf(stdout, "Waiting for %d nodes at %s (torch.distributed TCP store)…", c.nnodes, master)
		l, agree, err := rendezvousMaster(ctx, master, c.nnodes, c.argsSig, stdout, false)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if !agree {
			// Mismatched arguments deadlock in NCCL until a watchdog fires.
			select {
			case <-ctx.Done():
				return 1
			case <-term:
				return 0
			}
		}
		lost = l
	} else if c.backend == "ray" {
		addr := os.Getenv("RAY_ADDRESS")
		if addr == "" {
			// ray.init(address=None) with no cluster starts a lone local one.
			logf(stdout, "No existing Ray cluster found; started a local Ray instance with %d GPUs.", local)
			if world > local {
				return waitPGForever(ctx, world, clock, stdout, stderr)
			}
		} else {
			l, code := joinCluster(ctx, addr, world, clock, stdout, stderr, term)
			if l == nil {
				return code
			}
			lost = l
		}
	}
	preset, err := presetFor(c.served+" "+c.model, c.tp, c.epOn() && (c.dp.on() || c.sgDP > 1))
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	loadFor := preset.Params.LoadTime
	if os.Getenv("SHOAL_SIM_LOAD_SECONDS") != "" {
		loadFor = time.Duration(envFloat("SHOAL_SIM_LOAD_SECONDS", 5) * float64(time.Second))
	}
	logf(stdout, "Simulating %s (%s)", preset.Name, preset.Source)
	if os.Getenv("SHOAL_SIM_FAULT") == "nccl-hang" {
		// A startup hang in NCCL init (vllm#13136): nothing more is logged,
		// the port never opens, only a signal ends it.
		logf(stdout, "NCCL INFO Bootstrap : Using eth0; NCCL INFO cudaDriverVersion 12040; ncclCommInitRank …")
		select {
		case <-ctx.Done():
			return 1
		case <-term:
			return 0
		}
	}
	logf(stdout, "Loading model weights from %s (%d ranks)…", c.model, world)
	select {
	case <-time.After(clock.Real(loadFor)):
	case <-ctx.Done():
		return 1
	case <-term:
		return 0
	case why := <-lost:
		fmt.Fprintf(stderr, "ERROR ray worker died during loading: %s\nRuntimeError: Engine core initialization failed.\n", why)
		return 1
	}
	p := preset.Params
	p.MaxNumSeqs, p.MaxModelLen = c.maxNumSeqs, c.maxModelLen
	if c.blockSize > 0 {
		p.NumGPUBlocks, p.BlockSize = p.NumGPUBlocks*p.BlockSize/c.blockSize, c.blockSize
	}
	if kv := p.NumGPUBlocks * p.BlockSize; c.maxModelLen > kv {
		fmt.Fprintf(stderr, "ValueError: The model's max seq len (%d) is larger than the maximum number of tokens that can be stored in KV cache (%d). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.\n", c.maxModelLen, kv)
		return 1
	}
	n, first := c.localRanks()
	if c.epOn() {
		p = preset.withEP(p, c.epNodes(local), c.dp.eplb, c.dp.redundant, c.epRanks())
		logf(stdout, "Expert parallelism over %d nodes: all-to-all %s + %s/token off-node, EPLB %v", p.EP.Nodes, p.EP.A2ALatency, p.EP.A2APerToken, c.dp.eplb)
	}
	logf(stdout, "GPU KV cache size: %d tokens", p.NumGPUBlocks*p.BlockSize)
	logf(stdout, "Maximum concurrency for %d tokens per request: %.2fx", p.MaxModelLen, float64(p.NumGPUBlocks*p.BlockSize)/float64(p.MaxModelLen))
	s := newServer(c, p, clock)
	if n > 1 || c.dp.on() {
		s.dp = newDPRanks(c, p, clock, n, first)
		s.eng, s.m = s.dp.engines[0], s.dp.engines[0].m
		logf(stdout, "Started %d DP engine(s), ranks %d-%d of %d", n, first, first+n-1, max(c.dp.size, n))
	}
	eng := s.eng
	if c.kvTransfer != nil {
		if s.nixl, err = startNIXL(c.kvTransfer, c, preset, clock, first, s.eng.m); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer s.nixl.close()
		logf(stdout, "NixlConnector: engine %s, side channel %s:%d, lease %s, load failure policy %s", s.nixl.engineID, s.nixl.host, s.nixl.port,
			c.kvTransfer.lease, c.kvTransfer.FailurePolicy)
	}
	if c.disagg != nil {
		if s.sgl, err = startSGLDisagg(c.disagg, c.host, preset, clock); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer s.sgl.close()
		logf(stdout, "Disaggregation mode %s, transfer backend %s, bootstrap port %d", c.disagg.mode, c.disagg.backend, c.disagg.bootstrapPort)
	}
	pub, err := startKVEvents(s, c.kvEvents, c.hashAlgo)
	if err != nil {
		fmt.Fprintf(stderr, "zmq.error.ZMQError: %v\n", err)
		return 1
	}
	if pub != nil {
		defer pub.Close()
		logf(stdout, "KV cache events: publishing on %s (replay %v, topic %q)", c.kvEvents.Endpoint, c.kvEvents.ReplayEndpoint != nil, c.kvEvents.Topic)
	}
	// The socket is bound only now: vLLM does not accept connections until ready.
	ln, err := net.Listen("tcp", net.JoinHostPort(c.host, strconv.Itoa(c.port)))
	if err != nil {
		fmt.Fprintf(stderr, "OSError: [Errno 98] error while attempting to bind on address ('%s', %d): address already in use (%v)\n", c.host, c.port, err)
		return 1
	}
	engCtx, cancelEng := context.WithCancel(context.Background())
	defer cancelEng()
	if s.dp != nil {
		go s.dp.Run(engCtx)
	} else {
		go eng.Run(engCtx)
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	logf(stdout, "Starting vLLM API server 0 on http://%s:%d", c.host, c.port)
	logf(stdout, "Application startup complete.")

	died := make(chan struct{})
	var once sync.Once
	s.engines(func(e *Engine) { e.onDeath = func() { once.Do(func() { close(died) }) } })
	var workerLost string
	for {
		select {
		case <-ctx.Done():
			return shutdown(srv, eng, 0, stdout)
		case <-term:
			logf(stdout, "Received SIGTERM; shutting down (shutdown timeout %ds).", c.shutdownTimeout)
			return shutdown(srv, eng, time.Duration(c.shutdownTimeout)*time.Second, stdout)
		case why := <-dpLost:
			// A DP peer is gone: every rank's next MoE all-to-all waits for it.
			fmt.Fprintf(stderr, "WARNING DP peer %s is gone; this process's ranks hang in their next collective until stopped\n", why)
			s.dp.wedge()
			dpLost = nil
		case why := <-lost:
			if why == "gcs" {
				// The head's GCS is gone: the Ray driver dies with it.
				fmt.Fprintln(stderr, "ERROR Ray GCS connection lost; EngineCore exiting.")
				eng.kill(ErrEngineDead)
				lost = nil
				continue
			}
			// A worker node died. V1's check_health() assumes Ray workers are
			// healthy (vllm#16259): /health stays 200 until a step runs.
			workerLost = why
			s.faults.setWorkerDead(true)
			fmt.Fprintf(stderr, "WARNING (raylet) node %s died; the engine has not noticed yet\n", why)
			lost = nil
		case <-died:
			// The API server's watchdog polls every 5 s and then exits.
			fmt.Fprintf(stderr, "ERROR AsyncLLM output_handler failed. EngineDeadError%s\n", map[bool]string{true: " (ray worker " + workerLost + " died)", false: ""}[workerLost != ""])
			time.Sleep(clock.Real(5 * time.Second))
			_ = srv.Close()
			return 1
		}
	}
}

func shutdown(srv *http.Server, eng *Engine, drain time.Duration, w io.Writer) int {
	if drain > 0 {
		srv.SetKeepAlivesEnabled(false)
		deadline := time.Now().Add(drain)
		for time.Now().Before(deadline) {
			r, q := eng.queueLens()
			if r == 0 && q == 0 {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	eng.kill(fmt.Errorf("aborted: server shutting down"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = srv.Shutdown(ctx)
	logf(w, "Shutting down FastAPI HTTP server.")
	return 0
}

// joinCluster waits until the Ray cluster at addr holds world GPUs and this
// host's VLLM_HOST_IP is one of its nodes, logging like _wait_until_pg_ready.
// It returns a channel that yields "gcs" when the head goes away, or a node IP
// when a worker leaves.
func joinCluster(ctx context.Context, addr string, world int, clock Clock, stdout, stderr io.Writer, term <-chan os.Signal) (<-chan string, int) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		fmt.Fprintf(stderr, "ConnectionError: ray.init: could not connect to the Ray cluster at %s: %v\n", addr, err)
		return nil, 1
	}
	if err := json.NewEncoder(c).Encode(gcsMsg{Op: "watch"}); err != nil {
		c.Close()
		fmt.Fprintf(stderr, "ConnectionError: ray.init: %v\n", err)
		return nil, 1
	}
	updates := make(chan []rayNode, 16)
	go func() {
		defer close(updates)
		dec := json.NewDecoder(bufio.NewReader(c))
		for {
			var m gcsMsg
			if dec.Decode(&m) != nil {
				return
			}
			updates <- m.Nodes
		}
	}()
	hostIP := os.Getenv("VLLM_HOST_IP")
	start := time.Now()
	interval := 10 * time.Second
	nextLog := start.Add(clock.Real(interval))
	warned := false
	var nodes []rayNode
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		total := 0.0
		ipOK := hostIP == ""
		for _, n := range nodes {
			total += n.GPUs
			if n.IP == hostIP {
				ipOK = true
			}
		}
		if int(total) >= world && ipOK && nodes != nil {
			break
		}
		if nodes != nil && int(total) < world && !warned {
			logf(stdout, "WARNING The number of required GPUs exceeds the total number of available GPUs in the placement group.")
			warned = true
		}
		select {
		case l, ok := <-updates:
			if !ok {
				c.Close()
				fmt.Fprintf(stderr, "ConnectionError: lost the Ray GCS at %s while waiting for the placement group\n", addr)
				return nil, 1
			}
			nodes = l
		case <-tick.C:
			now := time.Now()
			if int(total) >= world && !ipOK {
				// vllm#7815: bundle 0 asks for node:<VLLM_HOST_IP>, which no node has.
				// Real vLLM waits here; so does the simulator, with the message users see.
				if now.After(nextLog) {
					logf(stdout, "Waiting for creating a placement group of specs for %d seconds. specs=[{'GPU': 1.0, 'node:%s': 0.001}, ...]. Check `ray status` and `ray list nodes` to see if you have enough resources, and make sure the IP addresses used by ray cluster are the same as VLLM_HOST_IP environment variable specified in each node if you are running on a multi-node.",
						int(clock.Scale*now.Sub(start).Seconds()), hostIP)
					interval *= 2
					nextLog = now.Add(clock.Real(interval))
				}
				continue
			}
			if now.After(nextLog) {
				logf(stdout, "Waiting for creating a placement group of specs for %d seconds. specs=[{'GPU': 1.0}] * %d. Check `ray status` and `ray list nodes` to see if you have enough resources.",
					int(clock.Scale*now.Sub(start).Seconds()), world)
				interval *= 2
				nextLog = now.Add(clock.Real(interval))
			}
			if now.Sub(start) > clock.Real(PGWaitTimeout) {
				c.Close()
				fmt.Fprintf(stderr, "ValueError: Cannot provide a placement group requiring %d GPUs (placement_group_specs=[{'GPU': 1.0}] * %d) within %d seconds. See `ray status` and `ray list nodes` to make sure the cluster has enough resources.\n",
					world, world, int(PGWaitTimeout.Seconds()))
				return nil, 1
			}
		case <-ctx.Done():
			c.Close()
			return nil, 1
		case <-term:
			c.Close()
			return nil, 0
		}
	}
	logf(stdout, "Placement group of %d GPUs is ready across %d nodes.", world, len(nodes))
	lost := make(chan string, 4)
	members := map[string]string{}
	for _, n := range nodes {
		members[n.ID] = n.IP
	}
	go func() {
		defer c.Close()
		for l := range updates {
			now := map[string]bool{}
			for _, n := range l {
				now[n.ID] = true
			}
			for id, ip := range members {
				if !now[id] {
					lost <- ip
					delete(members, id)
				}
			}
		}
		lost <- "gcs"
	}()
	return lost, 0
}

func waitPGForever(ctx context.Context, world int, clock Clock, stdout, stderr io.Writer) int {
	select {
	case <-time.After(clock.Real(PGWaitTimeout)):
		fmt.Fprintf(stderr, "ValueError: Cannot provide a placement group requiring %d GPUs within %d seconds.\n", world, int(PGWaitTimeout.Seconds()))
		return 1
	case <-ctx.Done():
		return 1
	}
}

// newServer builds the engine and its HTTP surface; the caller runs s.eng.
func newServer(c serveConfig, p Params, clock Clock) *Server {
	if c.lora.enabled {
		p = loraCosts(p)
	}
	m := newMetricsFlavor(c.served, p.NumGPUBlocks, p.BlockSize, p.MaxModelLen, p.MaxBatchTokens, c.v0Metrics, c.flavor)
	eng := newEngine(p, clock, m)
	m.eng = eng
	eng.enableLoRA(c.lora)
	return &Server{cfg: c, eng: eng, m: m, created: time.Now().Unix(), faults: &faults{}, loras: newLoras(c.lora)}
}

// serveHeadless is a node_rank > 0 of native multi-node: no API server, its
// GPUs take part in the head's collectives. As in vLLM (vllm#32136), it does
// not exit when the head goes away: whoever supervises it must notice.
func serveHeadless(ctx context.Context, c serveConfig, master string, stdout, stderr io.Writer, term <-chan os.Signal) int {
	logf(stdout, "Headless node rank %d: joining %s", c.nodeRank, master)
	conn, err := rendezvousJoin(ctx, master, c.nodeRank, c.argsSig)
	if err != nil {
		return 1
	}
	defer conn.Close()
	logf(stdout, "Headless node rank %d joined; no API server on this node", c.nodeRank)
	select {
	case <-ctx.Done():
		return 1
	case <-term:
		logf(stdout, "Received SIGTERM; shutting down headless rank %d", c.nodeRank)
		return 0
	}
}

// argsSignature digests the arguments every rank must share, leaving out the
// per-rank and API-server ones (each with its value, when it takes one).
func argsSignature(args, bools []string, perRank ...string) string {
	skip, isBool := map[string]bool{}, map[string]bool{}
	for _, f := range perRank {
		skip[f] = true
	}
	for _, f := range bools {
		isBool[f] = true
	}
	var kept []string
	for i := 0; i < len(args); i++ {
		name, _, hasVal := strings.Cut(args[i], "=")
		if skip[name] {
			if !hasVal && !isBool[name] && i+1 < len(args) {
				i++
			}
			continue
		}
		kept = append(kept, args[i])
	}
	return fmt.Sprintf("%x", hashString(strings.Join(kept, "\x00")))
}

// NewServer builds a simulated vLLM engine and HTTP surface for in-process
// use (benchmarks): served is the model name, timeScale the clock's speed-up.
// Call Run to step the engine.
func NewServer(served string, p Params, timeScale float64) *Server {
	return newServer(serveConfig{model: served, served: served, maxModelLen: p.MaxModelLen}, p, Clock{Scale: timeScale})
}

// Run steps the engine until ctx ends.
func (s *Server) Run(ctx context.Context) { s.eng.Run(ctx) }

// Stats is what a head's Replica API would report: running and waiting
// requests and KV-cache use (0-1).
func (s *Server) Stats() (running, waiting int, kv float64) {
	running, waiting = s.eng.queueLens()
	s.eng.mu.Lock()
	kv = s.eng.kv.usage()
	s.eng.mu.Unlock()
	return running, waiting, kv
}
