package engine

import (
	"fmt"
	"hash/fnv"
	"net"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/shoalhq/shoal/internal/kvhash"
	"github.com/shoalhq/shoal/spec"
)

// Role is a node's part in a replica group.
type Role string

// Roles.
const (
	RoleHead   Role = "head"
	RoleWorker Role = "worker"
)

// Command is one process to run.
type Command struct {
	// Name identifies the process in logs and state ("ray", "vllm").
	Name string
	// Path is the executable; Args excludes it (Argv prepends the argv[0] a
	// shell user would type).
	Path string
	Args []string
	// Env is KEY=VALUE, sorted: with the few basics of ProcessEnv, the whole
	// environment the engine gets.
	Env []string
	// Container is used by the containerd runtime only.
	Container Container
	// Log names the process's log file (Log + ".log"); unset: Name. Several
	// processes of one name on a node (a rank each) need their own.
	Log string `json:",omitempty"`
}

// LogName is the base name of the process's log file.
func (c Command) LogName() string {
	if c.Log != "" {
		return c.Log
	}
	return c.Name
}

// Argv is the command line as a user would type it: the program's base name, then Args.
func (c Command) Argv() []string {
	return append([]string{c.Name}, c.Args...)
}

// String renders the command line with its environment, for logs and describe.
func (c Command) String() string {
	return strings.Join(c.Env, " ") + " " + strings.Join(c.Argv(), " ")
}

// Binaries are the executables the plan names. In dev and tests both point at
// shoal-sim (busybox style); on a GPU host they are the real ray and vllm.
type Binaries struct {
	Ray    string
	VLLM   string
	Python string // runs `-m sglang.launch_server`
}

// PlanInput is what a plan depends on.
type PlanInput struct {
	Spec     *spec.Deployment
	Role     Role
	NodeIP   string
	HeadIP   string
	BindHost string
	// Env is added to every process (e.g. NCCL/GLOO variables from the agent's config).
	Env map[string]string
	Bin Binaries
	// Epoch and Term are the group's and its head's; a data-parallel
	// group's ports follow them.
	Epoch, Term uint64
	// MemberIPs are the group's members' addresses by node rank (the head
	// first); a data-parallel group needs them for its routers.
	MemberIPs []string
	// PortOffset is the node's port band (a Slurm job's; 0 on a systemd
	// host): the spec's ports are already shifted by it, and Ray's own
	// fixed ports are moved by it too, so that two jobs on a node never
	// meet. Such a node shares its host: `ray stop --force` would end
	// every Ray on it, so it is not run.
	PortOffset int
}

// Plan is what one node runs for its role.
type Plan struct {
	Role Role
	// Node is the process every member runs: `ray start … --block` for
	// ray-vllm, the user's program for command.
	Node Command
	// RayStop says whether `ray stop --force` cleans up after a stop.
	RayStop bool
	// Extra are more processes this node runs beside Node (external
	// load balancing: one engine per local DP rank), started after it.
	Extra []Command `json:",omitempty"`
	// Serve is `vllm serve …`, on the head only, after the GPU gate.
	Serve *Command
	// RayAddress is HEAD_IP:PORT.
	RayAddress string
	// ExpectedGPUs is N×G: the gate waits until Ray reports this many.
	ExpectedGPUs int
	// Endpoint is host:port of the OpenAI server (head only).
	Endpoint string
	// Canary is the API path the readiness probe and the idle canary use, or
	// "none" (read it with CanaryEndpoint: plans persisted before it existed
	// have "", which is /v1/completions).
	Canary string `json:",omitempty"`
	// CanaryFields are added to the canary's body: an SGLang
	// disaggregated engine serves only requests with a bootstrap room, and
	// takes SGLang's fake bootstrap host (its own warm-up's) as one that
	// needs no peer.
	CanaryFields map[string]any `json:",omitempty"`
	// KVEvents is how the head hears the engine's KV-cache events (head
	// only; nil: it publishes none).
	KVEvents *KVEvents `json:",omitempty"`
	// APIServers are every OpenAI server of a data-parallel group (head
	// only; nil: Endpoint is the group's one server).
	APIServers []APIServer `json:",omitempty"`
}

// KVEvents is an engine's KV-event publishing as shoal sets it up: the
// engine connects its PUB socket to the head's agent over loopback (vLLM
// connects to a non-wildcard endpoint, so nothing listens off the host) and
// binds its replay socket on the next port; blocks are named by vLLM's
// sha256_cbor chain under PYTHONHASHSEED, which routers can compute.
type KVEvents struct {
	Endpoint string
	Replay   string
	Topic    string
	Algo     string
	Seed     string
	// BlockSize is --block-size from engine.args, else vLLM's default of
	// 16; the engine's first BlockStored corrects it (an attention backend
	// may need another size, e.g. 64 for FlashMLA).
	BlockSize int
}

// defaultBlockSize is vLLM's --block-size default on CUDA.
const defaultBlockSize = 16

// KVEventsTopic is the topic shoal's engines publish KV events under.
const KVEventsTopic = "kv-events"

// defaultPageSize is the --page-size shoal gives an SGLang engine with KV
// events on (SGLang's own default, 1, would make every token a block: an
// event and an index entry each).
const defaultPageSize = 16

// kvEvents returns the head's KV-event set-up for a vLLM or SGLang engine,
// the flags that turn it on and the environment it needs; nil when the
// spec has it off (spec.KVEventsActive says why).
func kvEvents(s *spec.Deployment, env map[string]string, nodeIP string) (*KVEvents, []string) {
	if on, _ := spec.KVEventsActive(s); !on {
		return nil, nil
	}
	port := spec.KVEventsPortOf(&s.Engine)
	// Loopback only; a node whose own address is a loopback one (several
	// agents on one machine, as `shoal dev` runs them) keeps to it.
	host := "127.0.0.1"
	if ip := net.ParseIP(nodeIP); ip != nil && ip.IsLoopback() {
		host = nodeIP
	}
	k := &KVEvents{Endpoint: "tcp://" + net.JoinHostPort(host, strconv.Itoa(port)), Replay: "tcp://" + net.JoinHostPort(host, strconv.Itoa(port+1)),
		Topic: KVEventsTopic, Algo: "sha256_cbor", Seed: env["PYTHONHASHSEED"], BlockSize: defaultBlockSize}
	if s.Engine.Kind == spec.EngineSGLang {
		return sglangKVEvents(s, k)
	}
	if k.Seed == "" {
		// One seed for every replica of the deployment, so that they and
		// the routers name a block alike.
		h := fnv.New32a()
		_, _ = h.Write([]byte(s.Name))
		k.Seed = strconv.FormatUint(uint64(h.Sum32()), 10)
		env["PYTHONHASHSEED"] = k.Seed
	}
	if v, ok := spec.ArgValue(s.Engine.Args, "--block-size"); ok {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			k.BlockSize = n
		}
	}
	cfg := `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"` + k.Endpoint + `","replay_endpoint":"` + k.Replay +
		`","topic":"` + k.Topic + `"}`
	return k, []string{"--kv-events-config", cfg, "--prefix-caching-hash-algo", k.Algo}
}

// sglangKVEvents is kvEvents for SGLang: its radix cache names pages by
// SHA-256 chain with no seed (kvhash.AlgoSGLangPage); the page size is
// --page-size from engine.args, else defaultPageSize, which shoal passes.
func sglangKVEvents(s *spec.Deployment, k *KVEvents) (*KVEvents, []string) {
	k.Algo, k.Seed, k.BlockSize = kvhash.AlgoSGLangPage, "", defaultPageSize
	var page []string
	if v, ok := spec.ArgValue(s.Engine.Args, "--page-size"); ok {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			k.BlockSize = n
		}
	} else {
		page = []string{"--page-size", strconv.Itoa(defaultPageSize)}
	}
	cfg := `{"publisher":"zmq","endpoint":"` + k.Endpoint + `","replay_endpoint":"` + k.Replay + `","topic":"` + k.Topic + `"}`
	return k, append([]string{"--kv-events-config", cfg}, page...)
}

// checkInput rejects a plan input without a spec or with non-IP addresses.
func checkInput(in PlanInput) error {
	if in.Spec == nil {
		return fmt.Errorf("plan: no spec")
	}
	if net.ParseIP(in.NodeIP) == nil {
		return fmt.Errorf("plan: node ip %q is not an IP address", in.NodeIP)
	}
	if net.ParseIP(in.HeadIP) == nil {
		return fmt.Errorf("plan: head ip %q is not an IP address", in.HeadIP)
	}
	return nil
}

// mergeEnv is base with over on top (the spec's env wins over the agent's).
func mergeEnv(base, over map[string]string) map[string]string {
	env := make(map[string]string, len(base)+len(over))
	for k, v := range base {
		env[k] = v
	}
	for k, v := range over {
		env[k] = v
	}
	return env
}

// Ray's fixed default ports (`ray start --help`), moved by a port band.
const (
	RayDashboardPort      = 8265
	RayClientServerPort   = 10001
	RayDashboardAgentPort = 52365
)

// RayVLLM builds the ray-vllm plan (docs/design/engines.md §A1).
func RayVLLM(in PlanInput) (*Plan, error) {
	if err := checkInput(in); err != nil {
		return nil, err
	}
	s := in.Spec
	gpus := strconv.Itoa(s.Resources.GPUsPerNode)
	rayAddr := net.JoinHostPort(in.HeadIP, strconv.Itoa(s.Engine.RayPort))
	env := mergeEnv(in.Env, s.Engine.Env)
	// vLLM's get_ip() must equal Ray's node IP on every node (vllm#7815), and
	// VLLM_HOST_IP is not carried from the driver to the workers, so every
	// node's `ray start` gets its own.
	env["VLLM_HOST_IP"] = in.NodeIP
	env["RAY_NODE_IP_ADDRESS"] = in.NodeIP
	env["RAY_OVERRIDE_NODE_IP_ADDRESS"] = in.NodeIP
	// Ray's workers inherit the raylet's environment: each node's NIXL side
	// channel must bind that node's own address, and its all-to-all use its
	// own HCAs.
	transferEnv(s, env, in.NodeIP)
	p := &Plan{Role: in.Role, RayAddress: rayAddr, ExpectedGPUs: s.Resources.Nodes * s.Resources.GPUsPerNode, RayStop: in.PortOffset == 0}
	var banded []string // Ray's fixed ports, moved into the node's band
	if off := in.PortOffset; off > 0 {
		banded = []string{"--dashboard-agent-listen-port=" + strconv.Itoa(RayDashboardAgentPort+off)}
		if in.Role == RoleHead {
			banded = append(banded, "--dashboard-port="+strconv.Itoa(RayDashboardPort+off), "--ray-client-server-port="+strconv.Itoa(RayClientServerPort+off))
		}
	}
	switch in.Role {
	case RoleHead:
		if in.NodeIP != in.HeadIP {
			return nil, fmt.Errorf("plan: head %s planned with head ip %s", in.NodeIP, in.HeadIP)
		}
		p.Node = Command{Name: "ray", Path: in.Bin.Ray, Env: envList(env), Args: append([]string{
			"start", "--head", "--node-ip-address=" + in.NodeIP, "--port=" + strconv.Itoa(s.Engine.RayPort)}, append(banded,
			"--num-gpus="+gpus, "--disable-usage-stats", "--block")...)}
		host := in.BindHost
		if host == "" {
			host = in.NodeIP
		}
		args := []string{"serve", ModelArg(s),
			"--served-model-name", s.Engine.ServedModelName,
			"--host", host, "--port", strconv.Itoa(s.Engine.Port),
			"--tensor-parallel-size", strconv.Itoa(s.Engine.TensorParallelSize),
			"--pipeline-parallel-size", strconv.Itoa(s.Engine.PipelineParallelSize),
			"--distributed-executor-backend", "ray"}
		serveEnv := mergeEnv(env, map[string]string{"RAY_ADDRESS": rayAddr})
		loraEnv(s, serveEnv)
		kv, kvArgs := kvEvents(s, serveEnv, in.NodeIP)
		args = append(append(args, kvArgs...), vllmTail(s)...)
		p.KVEvents = kv
		p.Serve = &Command{Name: "vllm", Path: in.Bin.VLLM, Env: envList(serveEnv), Args: args}
		p.Endpoint = net.JoinHostPort(in.NodeIP, strconv.Itoa(s.Engine.Port))
		p.setCanary(s)
	case RoleWorker:
		p.Node = Command{Name: "ray", Path: in.Bin.Ray, Env: envList(env), Args: append([]string{
			"start", "--address=" + rayAddr, "--node-ip-address=" + in.NodeIP}, append(banded,
			"--num-gpus="+gpus, "--disable-usage-stats", "--block")...)}
	default:
		return nil, fmt.Errorf("plan: unknown role %q", in.Role)
	}
	return p, nil
}

func (p *Plan) setCanary(s *spec.Deployment) {
	p.Canary = CanaryPath(s)
	if p.Canary == "" {
		p.Canary = spec.CanaryNone
	}
	if k := s.Engine.KVTransfer; k != nil && s.Engine.Kind == spec.EngineSGLang {
		p.CanaryFields = map[string]any{"bootstrap_host": FakeBootstrapHost, "bootstrap_port": max(k.BootstrapPort, spec.DefaultBootstrapPort), "bootstrap_room": 0}
	}
}

// FakeBootstrapHost is SGLang's FAKE_BOOTSTRAP_HOST: a disaggregated
// engine given it as bootstrap_host runs the request without a peer (no
// KV moves), as SGLang's own server warm-up does.
const FakeBootstrapHost = "2.2.2.2"

// CanaryEndpoint is the API path of the plan's canary, "" for none.
func (p *Plan) CanaryEndpoint() string {
	switch p.Canary {
	case spec.CanaryNone:
		return ""
	case "":
		return CanaryCompletions // a plan persisted before canaries had endpoints
	}
	return p.Canary
}

// ModelArg is the model argument vLLM gets: the local path when there is one,
// the Hugging Face id for hf:// sources.
func ModelArg(s *spec.Deployment) string {
	if s.Model.Path != "" {
		return s.Model.Path
	}
	if rest, ok := strings.CutPrefix(s.Model.Source, "hf://"); ok {
		id, _, _ := strings.Cut(rest, "@")
		return id
	}
	return s.Model.Source
}

func envList(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// RayStatus is what `ray status` reported.
type RayStatus struct {
	ActiveNodes int
	UsedGPUs    float64
	TotalGPUs   float64
}

// ParseRayStatus reads the node count and the GPU line ("0.0/16.0 GPU") of
// `ray status` output. Older Ray says "Healthy:" where newer says "Active:".
func ParseRayStatus(out string) (RayStatus, error) {
	var st RayStatus
	section := ""
	foundGPU := false
	for _, line := range strings.Split(out, "\n") {
		t := strings.TrimSpace(line)
		switch t {
		case "Active:", "Healthy:":
			section = "active"
			continue
		case "Pending:", "Recent failures:", "Usage:", "Demands:", "Resources", "Node status":
			section = ""
			continue
		}
		if section == "active" && t != "" && !strings.HasPrefix(t, "(") && !strings.HasPrefix(t, "---") {
			n, _, ok := strings.Cut(t, " ")
			if c, err := strconv.Atoi(n); ok && err == nil {
				st.ActiveNodes += c
			}
		}
		if f := strings.Fields(t); len(f) == 2 && f[1] == "GPU" {
			used, total, ok := strings.Cut(f[0], "/")
			if !ok {
				continue
			}
			u, err1 := strconv.ParseFloat(used, 64)
			tt, err2 := strconv.ParseFloat(total, 64)
			if err1 != nil || err2 != nil {
				return st, fmt.Errorf("ray status: bad GPU line %q", t)
			}
			st.UsedGPUs, st.TotalGPUs, foundGPU = u, tt, true
		}
	}
	if !foundGPU && st.ActiveNodes == 0 {
		return st, fmt.Errorf("ray status: no node or GPU lines in output")
	}
	return st, nil
}

// Vars are what a command engine's argv and env templates may use.
type Vars struct {
	Rank            int    // this node's rank; the head is 0
	NNodes          int    // members in the group
	GPUs            int    // GPUs per node
	HeadAddr        string // the elected head's IP: the rendezvous address
	NodeIP          string // this node's IP
	Port            int    // the OpenAI port the head serves
	MasterPort      int    // the rendezvous port on the head
	Model           string // the model argument (local path or HF id)
	ServedModelName string
	// With engine.kvTransfer, the program speaks vLLM's NixlConnector
	// protocol: its role (prefill or decode), the side-channel port its
	// peers pull KV through, and what a decode engine does when a pull
	// fails (fail or recompute). Empty and 0 without kvTransfer.
	KVRole          string
	SideChannelPort int
	KVFailurePolicy string
}

// Command builds the plan of the command engine kind: every member runs the
// user's program with its rank and the head's address filled in; the head's
// program serves the OpenAI API on Port (readiness as for vLLM).
func CommandPlan(in PlanInput, rank int) (*Plan, error) {
	if err := checkInput(in); err != nil {
		return nil, err
	}
	s := in.Spec
	v := Vars{Rank: rank, NNodes: s.Resources.Nodes, GPUs: s.Resources.GPUsPerNode, HeadAddr: in.HeadIP, NodeIP: in.NodeIP,
		Port: s.Engine.Port, MasterPort: s.Engine.MasterPort, Model: ModelArg(s), ServedModelName: s.Engine.ServedModelName}
	if k := s.Engine.KVTransfer; k != nil {
		v.KVRole, v.SideChannelPort, v.KVFailurePolicy = k.Role, k.SideChannelPort, k.FailurePolicy
	}
	argv := make([]string, 0, len(s.Engine.Command))
	for i, a := range s.Engine.Command {
		out, err := render(a, v)
		if err != nil {
			return nil, fmt.Errorf("engine.command[%d]: %w", i, err)
		}
		argv = append(argv, out)
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, fmt.Errorf("engine.command: empty")
	}
	env := mergeEnv(in.Env, nil)
	nixlEnv(s, env, in.NodeIP)
	for k, tmpl := range s.Engine.Env {
		out, err := render(tmpl, v)
		if err != nil {
			return nil, fmt.Errorf("engine.env.%s: %w", k, err)
		}
		env[k] = out
	}
	p := &Plan{Role: in.Role, Node: Command{Name: "engine", Path: argv[0], Args: argv[1:], Env: envList(env)}}
	if in.Role == RoleHead {
		p.Endpoint = net.JoinHostPort(in.NodeIP, strconv.Itoa(s.Engine.Port))
		p.setCanary(s)
	}
	p.Node.Name = filepath.Base(argv[0])
	return p, nil
}

// render fills one template; an unknown variable is an error, not "<no value>".
func render(tmpl string, v Vars) (string, error) {
	t, err := template.New("").Option("missingkey=error").Parse(tmpl)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	if err := t.Execute(&b, v); err != nil {
		return "", err
	}
	return b.String(), nil
}

// ValidateTemplates checks a command spec's templates without a node.
func ValidateTemplates(s *spec.Deployment) error {
	_, err := CommandPlan(PlanInput{Spec: s, Role: RoleHead, NodeIP: "10.0.0.1", HeadIP: "10.0.0.1"}, 0)
	return err
}

// NativePlan builds the plan of the vllm (native multi-node) and sglang
// kinds: every member runs the engine itself with its node rank and the head
// as rendezvous (docs/design/engines.md §A2, §A3); only rank 0 serves
// HTTP. No Ray, so no GPU gate and no `ray stop`.
func NativePlan(in PlanInput, rank int) (*Plan, error) {
	if err := checkInput(in); err != nil {
		return nil, err
	}
	s := in.Spec
	env := mergeEnv(in.Env, s.Engine.Env)
	env["VLLM_HOST_IP"] = in.NodeIP
	host := in.BindHost
	if host == "" {
		host = in.NodeIP
	}
	e := s.Engine
	transferEnv(s, env, in.NodeIP)
	if e.Kind == spec.EngineVLLM {
		loraEnv(s, env)
	}
	if e.DataParallel != nil {
		return dpPlan(in, rank, env, host)
	}
	nn, r := strconv.Itoa(s.Resources.Nodes), strconv.Itoa(rank)
	var c Command
	var kv *KVEvents
	switch e.Kind {
	case spec.EngineVLLM:
		args := []string{"serve", ModelArg(s), "--served-model-name", e.ServedModelName,
			"--tensor-parallel-size", strconv.Itoa(e.TensorParallelSize), "--pipeline-parallel-size", strconv.Itoa(e.PipelineParallelSize),
			"--nnodes", nn, "--node-rank", r, "--master-addr", in.HeadIP, "--master-port", strconv.Itoa(e.MasterPort)}
		if rank == 0 {
			args = append(args, "--host", host, "--port", strconv.Itoa(e.Port))
			var kvArgs []string
			kv, kvArgs = kvEvents(s, env, in.NodeIP)
			args = append(args, kvArgs...)
		} else {
			args = append(args, "--headless")
		}
		c = Command{Name: "vllm", Path: in.Bin.VLLM, Args: append(args, vllmTail(s)...)}
	case spec.EngineSGLang:
		// SGLang's --tp is the whole group's tensor parallelism, as the spec's is.
		args := []string{"-m", "sglang.launch_server", "--model-path", ModelArg(s), "--served-model-name", e.ServedModelName,
			"--tp", strconv.Itoa(e.TensorParallelSize)}
		if e.PipelineParallelSize > 1 {
			args = append(args, "--pp-size", strconv.Itoa(e.PipelineParallelSize))
		}
		args = append(args, epArgs(s)...)
		args = append(args, "--dist-init-addr", net.JoinHostPort(in.HeadIP, strconv.Itoa(e.MasterPort)), "--nnodes", nn, "--node-rank", r,
			"--host", host, "--port", strconv.Itoa(e.Port), "--enable-metrics")
		args = append(args, sglangDisaggArgs(s, env)...)
		// Every rank gets the same flags (SGLang's ranks agree on the page
		// size); only the serving rank publishes, to its own head.
		var kvArgs []string
		kv, kvArgs = kvEvents(s, env, in.NodeIP)
		args = append(args, kvArgs...)
		c = Command{Name: "python3", Path: in.Bin.Python, Args: append(args, e.Args...)}
	default:
		return nil, fmt.Errorf("plan: engine kind %q is not native multi-node", e.Kind)
	}
	c.Env = envList(env)
	p := &Plan{Role: in.Role, Node: c}
	if in.Role == RoleHead {
		p.Endpoint = net.JoinHostPort(in.NodeIP, strconv.Itoa(e.Port))
		p.KVEvents = kv
		p.setCanary(s)
	}
	return p, nil
}
