package spec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/shoalhq/shoal/internal/bytesize"
	"github.com/shoalhq/shoal/model"

	"gopkg.in/yaml.v3"
)

// APIVersion is the only spec version this build understands.
const APIVersion = "shoal/v1"

// Engine kinds.
const (
	EngineRayVLLM = "ray-vllm"
	EngineVLLM    = "vllm"
	EngineSGLang  = "sglang"
	EngineCommand = "command"
)

// Deployment is one model served by R replicas of N nodes each.
type Deployment struct {
	APIVersion  string            `yaml:"apiVersion" json:"apiVersion"`
	Kind        string            `yaml:"kind" json:"kind"`
	Name        string            `yaml:"name" json:"name"`
	Model       Model             `yaml:"model" json:"model"`
	Engine      Engine            `yaml:"engine" json:"engine"`
	Resources   Resources         `yaml:"resources" json:"resources"`
	Replicas    Replicas          `yaml:"replicas" json:"replicas"`
	Autoscaling *Autoscaling      `yaml:"autoscaling,omitempty" json:"autoscaling,omitempty"`
	Router      *Router           `yaml:"router,omitempty" json:"router,omitempty"`
	Labels      map[string]string `yaml:"labels,omitempty" json:"labels,omitempty"`
	// Roles serves the model disaggregated: a prefill and a decode role,
	// each run as a deployment of its own (roles.go).
	Roles *Roles `yaml:"roles,omitempty" json:"roles,omitempty"`
	// Slurm: the deployment's nodes come from Slurm jobs (slurm.go).
	Slurm *Slurm `yaml:"slurm,omitempty" json:"slurm,omitempty"`
	// Adapters are LoRA adapters of the model, loaded on replicas at run
	// time (lora.go; engine.lora turns the engine's LoRA on).
	Adapters []Adapter `yaml:"adapters,omitempty" json:"adapters,omitempty"`
}

// Router is how routers treat this deployment's requests.
type Router struct {
	// Retries is how many more attempts a request gets, each at another
	// replica, when one fails before any byte of its answer reached the
	// client (0-10; unset: the router's --retries, default 2).
	Retries *int `yaml:"retries,omitempty" json:"retries,omitempty"`
}

// MaxRetries bounds router.retries.
const MaxRetries = 10

// Model says where the weights come from and where they live on each host.
type Model struct {
	// Source is hf://org/name[@rev], s3://bucket/prefix, gs://bucket/prefix or a path.
	Source   string   `yaml:"source" json:"source"`
	Suffixes []string `yaml:"suffixes,omitempty" json:"suffixes,omitempty"`
	// Path is where the engine reads the weights on every host; defaults to Source
	// when Source is a plain path.
	Path string `yaml:"path,omitempty" json:"path,omitempty"`
}

// Engine is how the engine is launched on the group's nodes.
type Engine struct {
	Kind    string `yaml:"kind" json:"kind"`
	Runtime string `yaml:"runtime,omitempty" json:"runtime,omitempty"`
	Image   string `yaml:"image,omitempty" json:"image,omitempty"`
	// ShmSize sizes the container's /dev/shm ("64Gi"; containerd runtime;
	// default half of the host's memory).
	ShmSize              string `yaml:"shmSize,omitempty" json:"shmSize,omitempty"`
	ServedModelName      string `yaml:"servedModelName,omitempty" json:"servedModelName,omitempty"`
	TensorParallelSize   int    `yaml:"tensorParallelSize,omitempty" json:"tensorParallelSize,omitempty"`
	PipelineParallelSize int    `yaml:"pipelineParallelSize,omitempty" json:"pipelineParallelSize,omitempty"`
	Port                 int    `yaml:"port,omitempty" json:"port,omitempty"`
	RayPort              int    `yaml:"rayPort,omitempty" json:"rayPort,omitempty"`
	// MasterPort is the rendezvous port on the head (command kind: torch's MASTER_PORT).
	MasterPort int `yaml:"masterPort,omitempty" json:"masterPort,omitempty"`
	// Command is the program of the command kind, argv with Go templates
	// ({{.Rank}}, {{.NNodes}}, {{.HeadAddr}}, {{.Port}}, {{.MasterPort}}, …);
	// env values may use the same templates.
	Command []string          `yaml:"command,omitempty" json:"command,omitempty"`
	Args    []string          `yaml:"args,omitempty" json:"args,omitempty"`
	Env     map[string]string `yaml:"env,omitempty" json:"env,omitempty"`
	// StartupTimeoutSeconds bounds download + load before the group is restarted.
	StartupTimeoutSeconds int `yaml:"startupTimeoutSeconds,omitempty" json:"startupTimeoutSeconds,omitempty"`
	// Canary is the endpoint the head's readiness probe and idle canary call:
	// completions, chat, embeddings or none; empty picks from engine.args
	// (embeddings for a pooling model, else completions).
	Canary string `yaml:"canary,omitempty" json:"canary,omitempty"`
	// KVEvents: the engine publishes its KV-cache events to the head, which
	// relays them to routers for prefix-aware routing (vLLM and SGLang
	// kinds; unset: on). KVEventsPort is the loopback port the head hears
	// them on (the engine's replay socket takes the next one); unset: port
	// + 10000.
	KVEvents     *bool `yaml:"kvEvents,omitempty" json:"kvEvents,omitempty"`
	KVEventsPort int   `yaml:"kvEventsPort,omitempty" json:"kvEventsPort,omitempty"`
	// DataParallel runs the group as data-parallel ranks of
	// tensorParallelSize GPUs each, across its nodes (vllm and sglang kinds;
	// docs/design/wide-ep.md). Unset: one TP × PP engine.
	DataParallel *DataParallel `yaml:"dataParallel,omitempty" json:"dataParallel,omitempty"`
	// ExpertParallel spreads a MoE model's experts over the ranks (EP = TP ×
	// DP) instead of sharding each expert by TP.
	ExpertParallel *ExpertParallel `yaml:"expertParallel,omitempty" json:"expertParallel,omitempty"`
	// KVTransfer makes this deployment's engines one side of prefill/decode
	// disaggregation: a prefill and a decode deployment serving the same
	// servedModelName form the pair (docs/design/pd.md).
	KVTransfer *KVTransfer `yaml:"kvTransfer,omitempty" json:"kvTransfer,omitempty"`
	// LoRA starts the engine with LoRA slots so that adapters can be loaded
	// while it runs (lora.go).
	LoRA *LoRA `yaml:"lora,omitempty" json:"lora,omitempty"`
}

// KVTransfer is a disaggregated engine's KV connector and role.
type KVTransfer struct {
	// Connector is nixl (vLLM's NixlConnector; SGLang's nixl transfer
	// backend) or mooncake (SGLang).
	Connector string `yaml:"connector" json:"connector"`
	// Role is prefill or decode: what routers use the engine for.
	Role string `yaml:"role" json:"role"`
	// FailurePolicy is what a decode engine does when the prompt's KV
	// cannot be pulled: fail (vLLM's default since 0.17) or recompute.
	FailurePolicy string `yaml:"failurePolicy,omitempty" json:"failurePolicy,omitempty"`
	// LeaseSeconds is how long a prefill engine keeps a prompt's KV for
	// its decode engine (vLLM's kv_lease_duration; unset: vLLM's 30).
	LeaseSeconds int `yaml:"leaseSeconds,omitempty" json:"leaseSeconds,omitempty"`
	// SideChannelPort is VLLM_NIXL_SIDE_CHANNEL_PORT; each DP rank binds
	// it plus its rank. Unset: 5600.
	SideChannelPort int `yaml:"sideChannelPort,omitempty" json:"sideChannelPort,omitempty"`
	// BootstrapPort is an SGLang prefill engine's
	// --disaggregation-bootstrap-port, where decode engines meet it.
	// Unset: SGLang's 8998.
	BootstrapPort int `yaml:"bootstrapPort,omitempty" json:"bootstrapPort,omitempty"`
}

// Disaggregation roles and connectors.
const (
	RolePrefill       = "prefill"
	RoleDecode        = "decode"
	ConnectorNIXL     = "nixl"
	ConnectorMooncake = "mooncake"
	// DefaultBootstrapPort is SGLang's --disaggregation-bootstrap-port default.
	DefaultBootstrapPort = 8998
	// DefaultNIXLPort is vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default.
	DefaultNIXLPort = 5600
)

// DataParallel is multi-node data parallelism (vLLM --data-parallel-*,
// SGLang --dp-size with --enable-dp-attention).
type DataParallel struct {
	// Size is the number of DP ranks in the group (vLLM
	// --data-parallel-size); size × tensorParallelSize = the group's GPUs.
	Size int `yaml:"size" json:"size"`
	// SizePerNode is the ranks on each node (--data-parallel-size-local);
	// unset: size / resources.nodes.
	SizePerNode int `yaml:"sizePerNode,omitempty" json:"sizePerNode,omitempty"`
	// LoadBalancing is where requests are spread over the ranks: internal
	// (one API server on the head, the other nodes --headless), hybrid (an
	// API server per node over its own ranks, routers spread over nodes and
	// ranks) or external (one engine process and port per rank, routers
	// pick the rank). Unset: internal.
	LoadBalancing string `yaml:"loadBalancing,omitempty" json:"loadBalancing,omitempty"`
	// RPCPort is the DP coordinator's port on the head
	// (--data-parallel-rpc-port; SGLang: --dist-init-addr's port); a group
	// uses RPCPort + (epoch + term - 2) mod DPPortWindow, so a re-formed or
	// restarted group never meets a stale rank of the last one on its
	// port. Unset: 29550.
	RPCPort int `yaml:"rpcPort,omitempty" json:"rpcPort,omitempty"`
	// APIServers is vLLM's --api-server-count on each node that serves
	// HTTP (internal and hybrid); unset: vLLM's default of one.
	APIServers int `yaml:"apiServers,omitempty" json:"apiServers,omitempty"`
}

// ExpertParallel is expert parallelism for MoE models.
type ExpertParallel struct {
	Enabled bool `yaml:"enabled" json:"enabled"`
	// All2AllBackend is vLLM's --all2all-backend or SGLang's
	// --moe-a2a-backend; unset: the engine's default. vLLM releases
	// before the flag read VLLM_ALL2ALL_BACKEND: set that in engine.env
	// instead and leave this unset.
	All2AllBackend string `yaml:"all2allBackend,omitempty" json:"all2allBackend,omitempty"`
	// EPLB turns on expert-parallel load balancing, which replicates hot
	// experts (about 2.4 GB per redundant expert per rank for DeepSeek-R1).
	EPLB *EPLB `yaml:"eplb,omitempty" json:"eplb,omitempty"`
}

// EPLB is vLLM's --eplb-config (SGLang: --ep-num-redundant-experts).
type EPLB struct {
	WindowSize       int `yaml:"windowSize,omitempty" json:"window_size,omitempty"`
	StepInterval     int `yaml:"stepInterval,omitempty" json:"step_interval,omitempty"`
	RedundantExperts int `yaml:"redundantExperts,omitempty" json:"num_redundant_experts,omitempty"`
}

// Load-balancing modes of engine.dataParallel.
const (
	LBInternal = "internal"
	LBHybrid   = "hybrid"
	LBExternal = "external"
)

// DefaultDPRPCPort is vLLM's --data-parallel-rpc-port default.
const DefaultDPRPCPort = 29550

// DPPortWindow is how many ports from dataParallel.rpcPort a group may
// use, one per (epoch, term) in turn.
const DPPortWindow = 16

// vLLM's --all2all-backend choices, and SGLang's --moe-a2a-backend ones.
var (
	VLLMAll2AllBackends   = []string{"naive", "allgather_reducescatter", "pplx", "deepep_high_throughput", "deepep_low_latency", "flashinfer_all2allv"}
	SGLangAll2AllBackends = []string{"none", "deepep", "mooncake"}
)

// EPOn says whether expert parallelism is on.
func (e *Engine) EPOn() bool { return e.ExpertParallel != nil && e.ExpertParallel.Enabled }

// DPRPCPort is the DP coordinator port of a group at epoch, led at term.
func (dp *DataParallel) DPRPCPort(epoch, term uint64) int {
	epoch, term = max(epoch, 1), max(term, 1)
	return dp.RPCPort + int((epoch-1+term-1)%DPPortWindow)
}

// APIPorts is how many consecutive ports from engine.port each node's API
// servers take: one per rank with external load balancing, else one.
func (dp *DataParallel) APIPorts() int {
	if dp.LoadBalancing == LBExternal {
		return dp.SizePerNode
	}
	return 1
}

// KVEventsPortOffset: engine.kvEventsPort defaults to engine.port plus this.
const KVEventsPortOffset = 10000

// Default ports: Ray's GCS, and the rendezvous of native engines and the
// command kind (torch's MASTER_PORT).
const (
	DefaultRayPort    = 6379
	DefaultMasterPort = 29500
)

// Values of engine.canary.
const (
	CanaryCompletions = "completions"
	CanaryChat        = "chat"
	CanaryEmbeddings  = "embeddings"
	CanaryNone        = "none"
)

// Resources is what each node of a replica must have.
type Resources struct {
	Nodes       int    `yaml:"nodes" json:"nodes"`
	GPUsPerNode int    `yaml:"gpusPerNode" json:"gpusPerNode"`
	GPUModel    string `yaml:"gpuModel,omitempty" json:"gpuModel,omitempty"`
	// MinGPUMemoryGiB places only on nodes whose GPUs have at least this much memory.
	MinGPUMemoryGiB int  `yaml:"minGPUMemoryGiB,omitempty" json:"minGPUMemoryGiB,omitempty"`
	RDMA            bool `yaml:"rdma,omitempty" json:"rdma,omitempty"`
}

// Replicas is a fixed count, or a min/max range for the autoscaler.
type Replicas struct {
	Count int `yaml:"count,omitempty" json:"count,omitempty"`
	Min   int `yaml:"min,omitempty" json:"min,omitempty"`
	Max   int `yaml:"max,omitempty" json:"max,omitempty"`
}

// Autoscaling is the policy that moves the replica count between
// replicas.min and replicas.max. Zero fields take the defaults below.
type Autoscaling struct {
	// Policy is kpa (Knative-style stable/panic windows) or apa (tolerance bands).
	Policy string `yaml:"policy" json:"policy"`
	// Metric is a head-reported engine metric, per replica.
	Metric string `yaml:"metric" json:"metric"`
	// Target is the metric's value one replica should carry.
	Target                float64 `yaml:"target" json:"target"`
	StableWindowSeconds   int     `yaml:"stableWindowSeconds,omitempty" json:"stableWindowSeconds,omitempty"`
	PanicWindowSeconds    int     `yaml:"panicWindowSeconds,omitempty" json:"panicWindowSeconds,omitempty"`
	PanicThreshold        float64 `yaml:"panicThreshold,omitempty" json:"panicThreshold,omitempty"`
	MaxScaleUpRate        float64 `yaml:"maxScaleUpRate,omitempty" json:"maxScaleUpRate,omitempty"`
	MaxScaleDownRate      float64 `yaml:"maxScaleDownRate,omitempty" json:"maxScaleDownRate,omitempty"`
	ScaleDownDelaySeconds int     `yaml:"scaleDownDelaySeconds,omitempty" json:"scaleDownDelaySeconds,omitempty"`
	// Tolerance is APA's band: no change while the metric is within ±Tolerance of target.
	Tolerance float64 `yaml:"tolerance,omitempty" json:"tolerance,omitempty"`
}

// Error is a validation error about one field.
type Error struct {
	Field string
	Msg   string
}

func (e *Error) Error() string { return e.Field + ": " + e.Msg }

// ErrInvalid is wrapped by every error Parse and Validate return.
var ErrInvalid = errors.New("invalid deployment spec")

var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// MaxNameLen keeps group ids (name-xxxxxx) small enough for gossip tags.
const MaxNameLen = 40

// Parse decodes one YAML document strictly (unknown fields are errors), applies
// defaults and validates.
func Parse(data []byte) (*Deployment, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, fmt.Errorf("%w: the file is empty; see deploy/deepseek-r1.yaml for an example", ErrInvalid)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var d Deployment
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalid, yamlMessage(err))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: the file holds more than one YAML document; apply one deployment per file", ErrInvalid)
	}
	d.Default()
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return &d, nil
}

// yamlMessage rewrites yaml.v3's Go-type wording into the spec's field names.
func yamlMessage(err error) string {
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "yaml: unmarshal errors:\n")
	msg = strings.TrimSpace(msg)
	re := regexp.MustCompile(`field (\S+) not found in type spec\.(\w+)`)
	msg = re.ReplaceAllString(msg, "unknown field \"$1\" in $2")
	return msg
}

// Default fills the fields a user may leave out.
func (d *Deployment) Default() {
	if d.Kind == "" {
		d.Kind = "Deployment"
	}
	e := &d.Engine
	if e.Kind == "" {
		e.Kind = EngineRayVLLM
	}
	if e.Runtime == "" {
		e.Runtime = "process"
	}
	if e.ServedModelName == "" {
		e.ServedModelName = d.Name
	}
	if d.Roles != nil {
		return // each role's deployment takes the rest (RoleDeployment)
	}
	if d.Slurm != nil {
		sl := *d.Slurm // a role's deployment shares its parent's
		sl.defaults(d.Resources)
		d.Slurm = &sl
	}
	if dp := e.DataParallel; dp != nil {
		n, g := d.Resources.Nodes, d.Resources.GPUsPerNode
		if dp.SizePerNode == 0 && n > 0 && dp.Size > 0 && dp.Size%n == 0 {
			dp.SizePerNode = dp.Size / n
		}
		if e.TensorParallelSize == 0 && dp.Size > 0 && n*g > 0 && (n*g)%dp.Size == 0 {
			e.TensorParallelSize = n * g / dp.Size
		}
		if e.PipelineParallelSize == 0 {
			e.PipelineParallelSize = 1
		}
		if dp.LoadBalancing == "" {
			dp.LoadBalancing = LBInternal
		}
		if dp.RPCPort == 0 {
			dp.RPCPort = DefaultDPRPCPort
		}
	}
	if e.TensorParallelSize == 0 {
		e.TensorParallelSize = d.Resources.GPUsPerNode
	}
	if e.PipelineParallelSize == 0 && d.Resources.Nodes > 0 && e.TensorParallelSize > 0 {
		e.PipelineParallelSize = d.Resources.Nodes * d.Resources.GPUsPerNode / e.TensorParallelSize
		if e.PipelineParallelSize == 0 {
			e.PipelineParallelSize = 1
		}
	}
	if e.Port == 0 {
		e.Port = 8000
	}
	if e.RayPort == 0 {
		e.RayPort = DefaultRayPort
	}
	if e.MasterPort == 0 {
		e.MasterPort = DefaultMasterPort
	}
	if k := e.KVTransfer; k != nil {
		switch {
		case e.Kind == EngineSGLang:
			if k.BootstrapPort == 0 && k.Role == RolePrefill {
				k.BootstrapPort = DefaultBootstrapPort
			}
		default:
			if k.FailurePolicy == "" {
				k.FailurePolicy = "fail"
			}
			if k.SideChannelPort == 0 {
				k.SideChannelPort = DefaultNIXLPort
			}
		}
	}
	if e.LoRA != nil {
		l := *e.LoRA
		l.defaults()
		e.LoRA = &l
	}
	if e.StartupTimeoutSeconds == 0 {
		// AIBrix's DeepSeek-R1 sample tolerates about 28 minutes for download + load.
		e.StartupTimeoutSeconds = 1800
	}
	if d.Model.Path == "" && isPath(d.Model.Source) {
		d.Model.Path = d.Model.Source
	}
	if d.Replicas.Count == 0 && d.Replicas.Min == 0 && d.Replicas.Max == 0 {
		d.Replicas.Count = 1
	}
	if a := d.Autoscaling; a != nil {
		if a.StableWindowSeconds == 0 {
			a.StableWindowSeconds = 60
		}
		if a.PanicWindowSeconds == 0 {
			a.PanicWindowSeconds = 6
		}
		if a.PanicThreshold == 0 {
			a.PanicThreshold = 2.0 // 200 %
		}
		if a.MaxScaleUpRate == 0 {
			a.MaxScaleUpRate = 2.0
		}
		if a.MaxScaleDownRate == 0 {
			a.MaxScaleDownRate = 2.0
		}
		if a.ScaleDownDelaySeconds == 0 {
			a.ScaleDownDelaySeconds = 300 // AIBrix's scale-down cooldown
		}
		if a.Tolerance == 0 {
			a.Tolerance = 0.1
		}
	}
}

func isPath(s string) bool { return strings.HasPrefix(s, "/") || strings.HasPrefix(s, "./") }

// Validate checks every field and returns all problems at once.
func (d *Deployment) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	if d.APIVersion != APIVersion {
		bad("apiVersion", "must be %q, got %q", APIVersion, d.APIVersion)
	}
	if r := d.Router; r != nil && r.Retries != nil && (*r.Retries < 0 || *r.Retries > MaxRetries) {
		bad("router.retries", "must be 0 to %d, got %d", MaxRetries, *r.Retries)
	}
	if d.Kind != "Deployment" {
		bad("kind", "must be \"Deployment\", got %q", d.Kind)
	}
	switch {
	case d.Name == "":
		bad("name", "is required")
	case len(d.Name) > MaxNameLen || !nameRE.MatchString(d.Name):
		bad("name", "%q must be lower-case letters, digits and '-', at most %d characters", d.Name, MaxNameLen)
	}
	if d.Roles != nil {
		if len(d.Adapters) > 0 {
			bad("adapters", "LoRA adapters on a deployment with roles are not supported yet")
		}
		if len(errs) == 0 {
			errs = append(errs, validateRoles(d)...)
		}
		if len(errs) == 0 {
			return nil
		}
		return fmt.Errorf("%w: %w", ErrInvalid, errors.Join(errs...))
	}
	if d.Slurm != nil {
		d.Slurm.validate(bad)
	}
	if d.Model.Source == "" && d.Engine.Kind != EngineCommand {
		// A command engine may bring its own weights (or need none).
		bad("model.source", "is required (hf://org/name, s3://bucket/prefix, gs://bucket/prefix or /path)")
	} else if d.Model.Source == "" {
	} else if err := checkSource(d.Model.Source); err != nil {
		bad("model.source", "%v", err)
	}
	if err := (model.Filter{Suffixes: d.Model.Suffixes}).Check(); err != nil {
		bad("model.suffixes", "%v", err)
	}
	if p := d.Model.Path; p != "" && (!strings.HasPrefix(p, "/") || strings.Contains("/"+p+"/", "/../")) {
		bad("model.path", "%q must be an absolute path without '..'", p)
	}
	e := d.Engine
	switch e.Kind {
	case EngineRayVLLM:
		if len(e.Command) > 0 {
			bad("engine.command", "is for kind %q; ray-vllm builds its own command lines", EngineCommand)
		}
	case EngineCommand:
		if len(e.Command) == 0 {
			bad("engine.command", "is required for kind command: the program and its arguments")
		}
	case EngineVLLM, EngineSGLang:
		if len(e.Command) > 0 {
			bad("engine.command", "is for kind %q", EngineCommand)
		}
	default:
		bad("engine.kind", "unknown engine %q; one of %s, %s, %s, %s", e.Kind, EngineRayVLLM, EngineVLLM, EngineSGLang, EngineCommand)
	}
	switch e.Runtime {
	case "process":
	case "containerd":
		if e.Image == "" {
			bad("engine.image", "is required with runtime containerd (e.g. vllm/vllm-openai:v0.11.0)")
		}
	default:
		bad("engine.runtime", "unknown runtime %q; one of process, containerd", e.Runtime)
	}
	if e.ShmSize != "" {
		if _, err := bytesize.Parse(e.ShmSize); err != nil {
			bad("engine.shmSize", "%v", err)
		}
	}
	if !nameRE.MatchString(strings.ToLower(strings.ReplaceAll(strings.ReplaceAll(e.ServedModelName, "/", "-"), ".", "-"))) {
		bad("engine.servedModelName", "%q has characters other than letters, digits, '-', '.', '/'", e.ServedModelName)
	}
	r := d.Resources
	if r.Nodes < 1 || r.Nodes > 64 {
		bad("resources.nodes", "must be between 1 and 64, got %d", r.Nodes)
	}
	if r.MinGPUMemoryGiB < 0 {
		bad("resources.minGPUMemoryGiB", "must not be negative")
	}
	if r.GPUsPerNode < 1 || r.GPUsPerNode > 64 {
		bad("resources.gpusPerNode", "must be between 1 and 64, got %d", r.GPUsPerNode)
	}
	if e.TensorParallelSize < 1 {
		bad("engine.tensorParallelSize", "must be at least 1, got %d", e.TensorParallelSize)
	}
	if e.PipelineParallelSize < 1 {
		bad("engine.pipelineParallelSize", "must be at least 1, got %d", e.PipelineParallelSize)
	}
	if e.KVTransfer != nil {
		errs = append(errs, validateKVTransfer(d)...)
	}
	errs = append(errs, validateLoRA(d)...)
	if e.DataParallel != nil || e.ExpertParallel != nil {
		errs = append(errs, validateParallel(d)...)
	} else if e.Kind != EngineCommand && e.TensorParallelSize >= 1 && e.PipelineParallelSize >= 1 && r.Nodes >= 1 && r.GPUsPerNode >= 1 &&
		e.TensorParallelSize*e.PipelineParallelSize != r.Nodes*r.GPUsPerNode {
		bad("engine.tensorParallelSize", "tensorParallelSize × pipelineParallelSize (%d × %d) must equal resources.nodes × resources.gpusPerNode (%d × %d)",
			e.TensorParallelSize, e.PipelineParallelSize, r.Nodes, r.GPUsPerNode)
	}
	checkPort := func(field string, p int) {
		if p < 1 || p > 65535 {
			bad(field, "must be a TCP port 1-65535, got %d", p)
		}
	}
	checkPort("engine.port", e.Port)
	checkPort("engine.rayPort", e.RayPort)
	checkPort("engine.masterPort", e.MasterPort)
	if e.KVEventsPort != 0 {
		checkPort("engine.kvEventsPort", e.KVEventsPort)
	}
	if e.KVEventsPort == 65535 || (e.KVEventsPort == 0 && e.Port+KVEventsPortOffset >= 65535 && KVEventsOn(d)) {
		bad("engine.kvEventsPort", "needs itself and the next port free: set it below 65535 (default engine.port + %d = %d)", KVEventsPortOffset, e.Port+KVEventsPortOffset)
	}
	if e.Port == e.RayPort {
		bad("engine.port", "must differ from engine.rayPort (%d)", e.RayPort)
	}
	for i, a := range e.Args {
		for _, owned := range ownedFlags {
			if a == owned || strings.HasPrefix(a, owned+"=") {
				bad(fmt.Sprintf("engine.args[%d]", i), "%s is set by shoal from the spec; set it through the matching spec field instead", owned)
			}
		}
	}
	for k := range e.Env {
		if k == "" || strings.ContainsAny(k, "= \x00") {
			bad("engine.env", "invalid variable name %q", k)
		}
	}
	if e.StartupTimeoutSeconds < 0 {
		bad("engine.startupTimeoutSeconds", "must not be negative")
	}
	switch e.Canary {
	case "", CanaryCompletions, CanaryChat, CanaryEmbeddings, CanaryNone:
	default:
		bad("engine.canary", "unknown endpoint %q; one of %s, %s, %s, %s", e.Canary, CanaryCompletions, CanaryChat, CanaryEmbeddings, CanaryNone)
	}
	rp := d.Replicas
	switch {
	case rp.Count < 0:
		bad("replicas.count", "must not be negative, got %d", rp.Count)
	case rp.Min < 0:
		bad("replicas.min", "must not be negative, got %d", rp.Min)
	case rp.Max < 0:
		bad("replicas.max", "must not be negative, got %d", rp.Max)
	case rp.Count > 0 && (rp.Min > 0 || rp.Max > 0):
		bad("replicas.count", "set either count or min/max, not both")
	case rp.Count == 0 && rp.Max < rp.Min:
		bad("replicas.max", "must be at least replicas.min (%d), got %d", rp.Min, rp.Max)
	case rp.Count == 0 && rp.Max == 0:
		bad("replicas.max", "is required with replicas.min")
	}
	if a := d.Autoscaling; a != nil {
		switch a.Policy {
		case "kpa", "apa":
		default:
			bad("autoscaling.policy", "unknown policy %q; one of kpa, apa", a.Policy)
		}
		switch a.Metric {
		case "kv_cache_usage_perc", "num_requests_waiting", "num_requests_running", "gpu_cache_usage_perc", "generation_tokens_per_second":
		default:
			bad("autoscaling.metric", "unknown metric %q; one of kv_cache_usage_perc, num_requests_waiting, num_requests_running, generation_tokens_per_second", a.Metric)
		}
		if d.Replicas.Count > 0 {
			bad("replicas.count", "is fixed; with autoscaling set replicas.min and replicas.max instead")
		}
		if a.StableWindowSeconds < 0 {
			bad("autoscaling.stableWindowSeconds", "must not be negative, got %d", a.StableWindowSeconds)
		} else if a.PanicWindowSeconds > a.StableWindowSeconds || a.PanicWindowSeconds < 0 {
			bad("autoscaling.panicWindowSeconds", "must be between 0 and stableWindowSeconds (%d), got %d", a.StableWindowSeconds, a.PanicWindowSeconds)
		}
		for _, r := range []struct {
			field string
			v     float64
		}{{"autoscaling.panicThreshold", a.PanicThreshold}, {"autoscaling.maxScaleUpRate", a.MaxScaleUpRate}, {"autoscaling.maxScaleDownRate", a.MaxScaleDownRate}} {
			if r.v < 1 {
				bad(r.field, "is a ratio of at least 1, got %v", r.v)
			}
		}
		if a.Tolerance < 0 || a.Tolerance >= 1 {
			bad("autoscaling.tolerance", "must be in [0, 1), got %v", a.Tolerance)
		}
		if a.ScaleDownDelaySeconds < 0 {
			bad("autoscaling.scaleDownDelaySeconds", "must not be negative, got %d", a.ScaleDownDelaySeconds)
		}
		if a.Target <= 0 {
			bad("autoscaling.target", "must be greater than 0")
		}
		if a.Metric == "kv_cache_usage_perc" && a.Target > 1 {
			bad("autoscaling.target", "kv_cache_usage_perc is a 0-1 fraction, got %v", a.Target)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrInvalid, errors.Join(errs...))
}

// ownedFlags are vLLM flags the launch plan sets from spec fields.
var ownedFlags = []string{"--served-model-name", "--host", "--port", "--tensor-parallel-size", "-tp",
	"--pipeline-parallel-size", "-pp", "--distributed-executor-backend"}

func checkSource(s string) error {
	_, err := model.ParseURI(s)
	return err
}

// DesiredReplicas is the count the reconciler keeps when no autoscaler decides.
func (d *Deployment) DesiredReplicas() int {
	if d.Replicas.Count > 0 {
		return d.Replicas.Count
	}
	return d.Replicas.Min
}

// JSON encodes the spec for the wire (Assign carries it to agents).
func (d *Deployment) JSON() []byte {
	b, _ := json.Marshal(d)
	return b
}

// FromJSON decodes a spec sent by the coordinator and validates it.
func FromJSON(b []byte) (*Deployment, error) {
	var d Deployment
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	d.Default()
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return &d, nil
}

// Field is one spec field as `shoal describe` shows it.
type Field struct {
	Path        string
	Value       string
	Implemented bool
}

// Fields lists the set fields, each marked with whether this build acts on it.
func (d *Deployment) Fields() []Field {
	var out []Field
	add := func(path string, v any, impl bool) {
		s := fmt.Sprint(v)
		if s == "" || s == "0" || s == "[]" || s == "map[]" || s == "false" {
			return
		}
		out = append(out, Field{Path: path, Value: s, Implemented: impl})
	}
	add("model.source", d.Model.Source, true)
	add("model.suffixes", strings.Join(d.Model.Suffixes, ","), true)
	add("model.path", d.Model.Path, true)
	add("engine.kind", d.Engine.Kind, true)
	add("engine.runtime", d.Engine.Runtime, true)
	add("engine.image", d.Engine.Image, d.Engine.Runtime == "containerd")
	add("engine.shmSize", d.Engine.ShmSize, d.Engine.Runtime == "containerd")
	add("engine.servedModelName", d.Engine.ServedModelName, true)
	add("engine.tensorParallelSize", d.Engine.TensorParallelSize, true)
	add("engine.pipelineParallelSize", d.Engine.PipelineParallelSize, true)
	add("engine.port", d.Engine.Port, true)
	// A port of another engine kind is shown (and warned about) only when it
	// was changed from its default: a default the user never wrote is not
	// "stored but not acted on".
	if d.Engine.Kind == EngineRayVLLM || d.Engine.RayPort != DefaultRayPort {
		add("engine.rayPort", d.Engine.RayPort, d.Engine.Kind == EngineRayVLLM)
	}
	if d.Engine.Kind != EngineRayVLLM || d.Engine.MasterPort != DefaultMasterPort {
		add("engine.masterPort", d.Engine.MasterPort, d.Engine.Kind != EngineRayVLLM)
	}
	add("engine.command", strings.Join(d.Engine.Command, " "), true)
	add("engine.args", strings.Join(d.Engine.Args, " "), true)
	keys := make([]string, 0, len(d.Engine.Env))
	for k := range d.Engine.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		add("engine.env."+k, d.Engine.Env[k], true)
	}
	add("engine.startupTimeoutSeconds", d.Engine.StartupTimeoutSeconds, true)
	add("engine.canary", d.Engine.Canary, true)
	on, _ := KVEventsActive(d)
	add("engine.kvEvents", on || (d.Engine.KVEvents != nil && *d.Engine.KVEvents), kvEventsKind(d.Engine.Kind)) // other engines: stored, not acted on
	if on || d.Engine.KVEventsPort != 0 {
		add("engine.kvEventsPort", KVEventsPortOf(&d.Engine), on)
	}
	if k := d.Engine.KVTransfer; k != nil {
		add("engine.kvTransfer.connector", k.Connector, true)
		add("engine.kvTransfer.role", k.Role, true)
		add("engine.kvTransfer.failurePolicy", k.FailurePolicy, true)
		add("engine.kvTransfer.leaseSeconds", k.LeaseSeconds, true)
		add("engine.kvTransfer.sideChannelPort", k.SideChannelPort, true)
		add("engine.kvTransfer.bootstrapPort", k.BootstrapPort, true)
	}
	if dp := d.Engine.DataParallel; dp != nil {
		add("engine.dataParallel.size", dp.Size, true)
		add("engine.dataParallel.sizePerNode", dp.SizePerNode, true)
		add("engine.dataParallel.loadBalancing", dp.LoadBalancing, true)
		add("engine.dataParallel.rpcPort", dp.RPCPort, true)
		add("engine.dataParallel.apiServers", dp.APIServers, true)
	}
	if ep := d.Engine.ExpertParallel; ep != nil {
		add("engine.expertParallel.enabled", ep.Enabled, true)
		add("engine.expertParallel.all2allBackend", ep.All2AllBackend, true)
		if ep.EPLB != nil {
			add("engine.expertParallel.eplb", EPLBConfig(ep.EPLB), true)
		}
	}
	if l := d.Engine.LoRA; l != nil {
		add("engine.lora.maxLoras", l.MaxLoras, true)
		add("engine.lora.maxLoraRank", l.MaxLoraRank, true)
		add("engine.lora.maxCpuLoras", l.MaxCPULoras, true)
	}
	add("adapters", len(d.Adapters), true)
	add("resources.nodes", d.Resources.Nodes, true)
	add("resources.gpusPerNode", d.Resources.GPUsPerNode, true)
	add("resources.gpuModel", d.Resources.GPUModel, true)
	add("resources.minGPUMemoryGiB", d.Resources.MinGPUMemoryGiB, true)
	add("resources.rdma", d.Resources.RDMA, true)
	add("replicas.count", d.Replicas.Count, true)
	add("replicas.min", d.Replicas.Min, true)
	add("replicas.max", d.Replicas.Max, true)
	if a := d.Autoscaling; a != nil {
		add("autoscaling.policy", a.Policy, true)
		add("autoscaling.metric", a.Metric, true)
		add("autoscaling.target", a.Target, true)
		add("autoscaling.stableWindowSeconds", a.StableWindowSeconds, true)
		add("autoscaling.panicWindowSeconds", a.PanicWindowSeconds, true)
		add("autoscaling.panicThreshold", a.PanicThreshold, true)
		add("autoscaling.scaleDownDelaySeconds", a.ScaleDownDelaySeconds, true)
	}
	if r := d.Router; r != nil && r.Retries != nil {
		add("router.retries", *r.Retries, true)
	}
	if sl := d.Slurm; sl != nil {
		add("slurm.partition", sl.Partition, true)
		add("slurm.account", sl.Account, true)
		add("slurm.qos", sl.QoS, true)
		add("slurm.gres", sl.GRES, true)
		add("slurm.timeLimitMinutes", sl.TimeLimitMinutes, true)
		add("slurm.handoverLeadSeconds", sl.HandoverLeadSeconds, true)
		add("slurm.queueWaitWarningSeconds", sl.QueueWaitWarningSeconds, true)
		add("slurm.options", strings.Join(sl.Options, " "), true)
	}
	for k, v := range d.Labels {
		add("labels."+k, v, false)
	}
	return out
}

// vllmKind says whether the engine is vLLM, launched by shoal.
func vllmKind(k string) bool { return k == EngineRayVLLM || k == EngineVLLM }

// kvEventsKind says whether shoal relays the engine kind's KV events.
func kvEventsKind(k string) bool { return vllmKind(k) || k == EngineSGLang }

// KVEventsOn says whether engine.kvEvents asks for KV events (unset: yes)
// on an engine kind that has them.
func KVEventsOn(d *Deployment) bool {
	return kvEventsKind(d.Engine.Kind) && d.Engine.DataParallel == nil && (d.Engine.KVEvents == nil || *d.Engine.KVEvents)
}

// kvEventFlags are engine flags with which the user takes KV events (or
// prefix caching) into their own hands: shoal then adds none of its own.
var kvEventFlags = map[bool][]string{
	false: {"--kv-events-config", "--prefix-caching-hash-algo", "--no-enable-prefix-caching"}, // vLLM
	true:  {"--kv-events-config", "--disable-radix-cache"},                                    // SGLang
}

// KVEventsActive says whether the head will relay the engine's KV events,
// and why not when it will not.
func KVEventsActive(d *Deployment) (bool, string) {
	if !kvEventsKind(d.Engine.Kind) {
		return false, "engine kind " + d.Engine.Kind + " does not publish KV events through shoal"
	}
	if d.Engine.DataParallel != nil {
		return false, "engine.dataParallel is set: each DP rank publishes its own events, which shoal does not relay yet"
	}
	if !KVEventsOn(d) {
		return false, "engine.kvEvents is false"
	}
	for _, a := range d.Engine.Args {
		name, _, _ := strings.Cut(a, "=")
		if f := strings.ReplaceAll(name, "_", "-"); slices.Contains(kvEventFlags[d.Engine.Kind == EngineSGLang], f) {
			return false, "engine.args set " + f
		}
	}
	return true, ""
}

// KVEventsPortOf is engine.kvEventsPort, or its default.
func KVEventsPortOf(e *Engine) int {
	if e.KVEventsPort != 0 {
		return e.KVEventsPort
	}
	return e.Port + KVEventsPortOffset
}
