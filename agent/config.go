package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/security"
	"gopkg.in/yaml.v3"
)

// Config is the agent's configuration: a YAML file, overridden by flags.
type Config struct {
	NodeID  string   `yaml:"node_id"`
	Cluster string   `yaml:"cluster"`
	Address string   `yaml:"address"` // this host's IP: gossip, gRPC and engines bind here
	Join    []string `yaml:"join"`
	// Ports on Address.
	GossipPort  int `yaml:"gossip_port"`
	GRPCPort    int `yaml:"grpc_port"`
	ReplicaPort int `yaml:"replica_port"`
	// MetricsAddr serves Prometheus /metrics ("" disables).
	MetricsAddr   string `yaml:"metrics_addr"`
	GossipProfile string `yaml:"gossip_profile"`
	StateDir      string `yaml:"state_dir"`
	GPUBackend    string `yaml:"gpu_backend"`
	RayBin        string `yaml:"ray_bin"`
	VLLMBin       string `yaml:"vllm_bin"`
	PythonBin     string `yaml:"python_bin"` // for SGLang: `python3 -m sglang.launch_server`
	// EngineHost is the address vLLM binds; "" means Address.
	EngineHost string `yaml:"engine_host"`
	// EngineEnv is added to every engine process (NCCL_SOCKET_IFNAME, …).
	EngineEnv map[string]string `yaml:"engine_env"`
	// StopGrace is how long an engine gets between SIGTERM and SIGKILL.
	StopGrace time.Duration `yaml:"stop_grace"`
	// RestartBackoff is the first wait before a failed group is restarted; it
	// doubles up to 5 minutes and resets once the group has served.
	RestartBackoff time.Duration `yaml:"restart_backoff"`
	// StopEnginesOnExit stops engines when the agent exits. By default they
	// keep running (and serving) and the next agent process adopts them: an
	// agent upgrade or crash does not take a replica down.
	StopEnginesOnExit bool `yaml:"stop_engines_on_exit"`
	// Containerd is the daemon used by deployments with engine.runtime: containerd.
	Containerd ContainerdConfig `yaml:"containerd"`
	// LogMaxBytes rotates an engine log past this size (default 100 MiB);
	// LogKeep old files are kept (default 3).
	LogMaxBytes int64 `yaml:"log_max_bytes"`
	LogKeep     int   `yaml:"log_keep"`
	// MemberGrace is how long a head waits for a member's agent that stopped
	// answering (an agent restart) before it fails the group (default 3s).
	MemberGrace time.Duration `yaml:"member_grace"`
	// GPUs are the indices of the host's GPUs this agent owns (empty: all);
	// several agents can share a host, each with its own GPUs and address.
	GPUs []int `yaml:"gpus"`
	// HangTimeout fails a replica whose engine has requests running but
	// produces no token for this long (vllm#53157: everything answers, nothing
	// generates).
	HangTimeout time.Duration `yaml:"hang_timeout"`
	// CanaryInterval sends a one-token completion to an idle head this often:
	// a silently dead Ray worker shows only when a step runs (vllm#16259).
	CanaryInterval time.Duration `yaml:"canary_interval"`
	// ModelsDir holds pulled weights, one directory per model: <models_dir>/<name>,
	// name from the source URI (s3://b/deepseek-r1 → deepseek-r1), unless the
	// spec sets model.path.
	ModelsDir string `yaml:"models_dir"`
	// SkipLocalModelCheck starts engines on local model paths without checking
	// that they are complete (shoal dev: the simulator reads no weights).
	SkipLocalModelCheck bool `yaml:"skip_local_model_check"`
	// Download tunes weight pulls.
	Download DownloadConfig `yaml:"download"`
	// InspectInterval re-reads the hardware (remapped rows, NVLinks, lost GPUs).
	InspectInterval time.Duration `yaml:"inspect_interval"`

	// Slurm: the agent runs as a task of a Slurm job step (`srun shoal
	// agent --slurm`); the fields below come from the step's environment.
	Slurm bool `yaml:"slurm"`
	// SlurmJob is the job the agent runs in; JobEnds reads the job's end
	// time from Slurm (it can change: `scontrol update TimeLimit`).
	SlurmJob string `yaml:"-"`
	// SlurmNodes is the job's node list (SLURM_JOB_NODELIST).
	SlurmNodes string                                   `yaml:"-"`
	JobEnds    func(context.Context) (time.Time, error) `yaml:"-"`
	// PortBand moves every port of the agent and its engines by
	// PortBand × 100, so that jobs sharing a node never clash (0: none).
	PortBand int `yaml:"-"`
	// GPUMinors and GPUUUIDs are the owned GPUs by device (/dev/nvidiaN)
	// number or by UUID, as Slurm names a step's GPUs, beside or instead
	// of GPUs.
	GPUMinors []int    `yaml:"-"`
	GPUUUIDs  []string `yaml:"-"`

	// TLS secures the Agent and Replica APIs and this agent's calls (nil:
	// cleartext, only with --insecure).
	TLS *security.TLS `yaml:"-"`
	// GossipKeys encrypt gossip (the first one is used to send).
	GossipKeys [][]byte `yaml:"-"`
	// GossipKeyFile is where the keys live; keyring changes are saved there.
	GossipKeyFile string `yaml:"gossip_key_file"`

	// Ready is called once, when the agent has fingerprinted its hardware,
	// joined the gossip and serves its API (systemd's READY=1).
	Ready func() `yaml:"-"`

	Logger *slog.Logger `yaml:"-"`
}

// ContainerdConfig names the containerd daemon and where shoal's containers live.
type ContainerdConfig struct {
	Address     string `yaml:"address"`     // default /run/containerd/containerd.sock
	Namespace   string `yaml:"namespace"`   // default shoal
	Snapshotter string `yaml:"snapshotter"` // default containerd's (overlayfs)
}

// DownloadConfig tunes weight pulls; endpoints and credentials default to the
// environment (AWS_*, HF_TOKEN, HF_ENDPOINT, GOOGLE_OAUTH_ACCESS_TOKEN).
type DownloadConfig struct {
	Workers     int `yaml:"workers"`
	PartSizeMiB int `yaml:"part_size_mib"`
	// LimitMiBps caps a pull's rate (0: none).
	LimitMiBps  int    `yaml:"limit_mib_per_second"`
	S3Endpoint  string `yaml:"s3_endpoint"`
	S3PathStyle *bool  `yaml:"s3_path_style"`
	HFEndpoint  string `yaml:"hf_endpoint"`
	GCSEndpoint string `yaml:"gcs_endpoint"`
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.NodeID == "" {
		c.NodeID, _ = os.Hostname()
	}
	if c.Cluster == "" {
		c.Cluster = "shoal"
	}
	if c.GossipPort == 0 {
		c.GossipPort = 7946
	}
	if c.GRPCPort == 0 {
		c.GRPCPort = 7947
	}
	if c.ReplicaPort == 0 {
		c.ReplicaPort = 7948
	}
	if c.StateDir == "" {
		c.StateDir = "/var/lib/shoal"
	}
	if c.ModelsDir == "" {
		c.ModelsDir = filepath.Join(c.StateDir, "models")
	}
	if c.RayBin == "" {
		c.RayBin = "ray"
	}
	if c.VLLMBin == "" {
		c.VLLMBin = "vllm"
	}
	if c.PythonBin == "" {
		c.PythonBin = "python3"
	}
	if c.StopGrace == 0 {
		c.StopGrace = 30 * time.Second
	}
	if c.RestartBackoff == 0 {
		c.RestartBackoff = 5 * time.Second
	}
	if c.HangTimeout == 0 {
		c.HangTimeout = 60 * time.Second
	}
	if c.CanaryInterval == 0 {
		c.CanaryInterval = 30 * time.Second
	}
	if c.LogMaxBytes == 0 {
		c.LogMaxBytes = engine.DefaultLogMaxBytes
	}
	if c.LogKeep == 0 {
		c.LogKeep = engine.DefaultLogKeep
	}
	if c.MemberGrace == 0 {
		c.MemberGrace = 3 * time.Second
	}
	if c.InspectInterval == 0 {
		c.InspectInterval = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate checks the config and names the field at fault.
func (c *Config) Validate() error {
	var errs []error
	if c.NodeID == "" || len(c.NodeID) > 63 {
		errs = append(errs, fmt.Errorf("node_id: must be 1-63 characters, got %q", c.NodeID))
	}
	if ip := net.ParseIP(c.Address); ip == nil || ip.IsUnspecified() {
		errs = append(errs, fmt.Errorf("address: %q must be this host's IP address (engines bind and advertise it; 0.0.0.0 is not one)", c.Address))
	}
	for name, p := range map[string]int{"gossip_port": c.GossipPort, "grpc_port": c.GRPCPort, "replica_port": c.ReplicaPort} {
		if p < 1 || p > 65535 {
			errs = append(errs, fmt.Errorf("%s: %d is not a TCP port", name, p))
		}
	}
	if c.GRPCPort == c.ReplicaPort {
		errs = append(errs, fmt.Errorf("replica_port: must differ from grpc_port (%d)", c.GRPCPort))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"stop_grace", c.StopGrace}, {"restart_backoff", c.RestartBackoff}, {"hang_timeout", c.HangTimeout},
		{"canary_interval", c.CanaryInterval}, {"member_grace", c.MemberGrace}, {"inspect_interval", c.InspectInterval}} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s: must not be negative, got %v", d.name, d.v))
		}
	}
	return errors.Join(errs...)
}

// LoadConfigFile reads a YAML config file; unknown keys are errors.
func LoadConfigFile(path string) (Config, error) {
	var c Config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("agent config: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) { // an all-comments file is an empty config
		return c, fmt.Errorf("agent config %s: %w", path, err)
	}
	return c, nil
}
