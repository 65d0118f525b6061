package main

import (
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/agent"
	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"
)

// runAgentConfig parses args as `shoal agent` does and returns the config
// the agent would run with (file, then flags).
func runAgentConfig(t *testing.T, args ...string) agent.Config {
	t.Helper()
	var cfg agent.Config
	cmd := agentCommand()
	cmd.Subcommands = nil
	cmd.Action = func(c *cli.Context) error {
		var err error
		cfg, err = agentConfig(c)
		return err
	}
	app := &cli.App{Name: "shoal", Commands: []*cli.Command{cmd}}
	require.NoError(t, app.Run(append([]string{"shoal", "agent"}, args...)))
	return cfg
}

// yamlKeys lists the config file's keys (nested ones as a.b).
func yamlKeys(t reflect.Type, prefix string) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct && f.Type.String() != "time.Duration" {
			out = append(out, yamlKeys(f.Type, prefix+tag+".")...)
			continue
		}
		out = append(out, prefix+tag)
	}
	return out
}

// TestAgentConfigKeys walks every key the agent's config file accepts: each
// is read (the config differs from an empty one) and, where a flag sets the
// same thing, the file and the flag give the same config. Every flag of
// `shoal agent` is either such a flag or a daemon-wide one tested elsewhere.
func TestAgentConfigKeys(t *testing.T) {
	cases := map[string]struct {
		yaml string
		flag []string // nil: the key has no flag
	}{
		"node_id":                       {"node_id: n7", []string{"--node-id", "n7"}},
		"cluster":                       {"cluster: c2", []string{"--cluster", "c2"}},
		"address":                       {"address: 10.0.0.7", []string{"--address", "10.0.0.7"}},
		"join":                          {"join: [10.0.0.1:7946, 10.0.0.2:7946]", []string{"--join", "10.0.0.1:7946", "--join", "10.0.0.2:7946"}},
		"gossip_port":                   {"gossip_port: 8946", []string{"--gossip-port", "8946"}},
		"grpc_port":                     {"grpc_port: 8947", []string{"--grpc-port", "8947"}},
		"replica_port":                  {"replica_port: 8948", []string{"--replica-port", "8948"}},
		"metrics_addr":                  {"metrics_addr: 10.0.0.7:9400", []string{"--metrics-addr", "10.0.0.7:9400"}},
		"gossip_profile":                {"gossip_profile: fast", []string{"--gossip-profile", "fast"}},
		"state_dir":                     {"state_dir: /srv/shoal", []string{"--state-dir", "/srv/shoal"}},
		"gpu_backend":                   {"gpu_backend: mock:h200x8", []string{"--gpu-backend", "mock:h200x8"}},
		"ray_bin":                       {"ray_bin: /opt/ray", []string{"--ray-bin", "/opt/ray"}},
		"vllm_bin":                      {"vllm_bin: /opt/vllm", []string{"--vllm-bin", "/opt/vllm"}},
		"python_bin":                    {"python_bin: /opt/py", []string{"--python-bin", "/opt/py"}},
		"engine_host":                   {"engine_host: 0.0.0.0", []string{"--engine-host", "0.0.0.0"}},
		"engine_env":                    {"engine_env: {NCCL_DEBUG: INFO}", []string{"--engine-env", "NCCL_DEBUG=INFO"}},
		"stop_grace":                    {"stop_grace: 45s", []string{"--stop-grace", "45s"}},
		"restart_backoff":               {"restart_backoff: 9s", []string{"--restart-backoff", "9s"}},
		"stop_engines_on_exit":          {"stop_engines_on_exit: true", []string{"--stop-engines-on-exit"}},
		"containerd.address":            {"containerd: {address: /run/c.sock}", []string{"--containerd-address", "/run/c.sock"}},
		"containerd.namespace":          {"containerd: {namespace: ns2}", []string{"--containerd-namespace", "ns2"}},
		"containerd.snapshotter":        {"containerd: {snapshotter: native}", nil},
		"log_max_bytes":                 {"log_max_bytes: 1048576", []string{"--log-max-size", "1Mi"}},
		"log_keep":                      {"log_keep: 7", nil},
		"member_grace":                  {"member_grace: 4s", nil},
		"gpus":                          {"gpus: [0, 1]", []string{"--gpus", "0", "--gpus", "1"}},
		"slurm":                         {"slurm: true", []string{"--slurm"}},
		"hang_timeout":                  {"hang_timeout: 90s", []string{"--hang-timeout", "90s"}},
		"canary_interval":               {"canary_interval: 11s", []string{"--canary-interval", "11s"}},
		"models_dir":                    {"models_dir: /data/models", []string{"--models-dir", "/data/models"}},
		"skip_local_model_check":        {"skip_local_model_check: true", []string{"--skip-local-model-check"}},
		"download.workers":              {"download: {workers: 12}", []string{"--workers", "12"}},
		"download.part_size_mib":        {"download: {part_size_mib: 128}", []string{"--part-size", "128Mi"}},
		"download.limit_mib_per_second": {"download: {limit_mib_per_second: 500}", []string{"--limit-rate", "500Mi"}},
		"download.s3_endpoint":          {"download: {s3_endpoint: 'http://s3:9000'}", []string{"--s3-endpoint", "http://s3:9000"}},
		"download.s3_path_style":        {"download: {s3_path_style: false}", []string{"--s3-path-style=false"}},
		"download.hf_endpoint":          {"download: {hf_endpoint: 'http://hf'}", []string{"--hf-endpoint", "http://hf"}},
		"download.gcs_endpoint":         {"download: {gcs_endpoint: 'http://gcs'}", nil},
		"inspect_interval":              {"inspect_interval: 2m", nil},
		"gossip_key_file":               {"gossip_key_file: /srv/gossip.key", []string{"--gossip-key-file", "/srv/gossip.key"}},
	}
	keys := yamlKeys(reflect.TypeOf(agent.Config{}), "")
	sort.Strings(keys)
	for _, k := range keys {
		if _, ok := cases[k]; !ok {
			t.Errorf("config key %s has no case here: add one (with its flag, if it has one)", k)
		}
	}
	flagged := map[string]bool{}
	empty := runAgentConfig(t)
	dir := t.TempDir()
	for key, tc := range cases {
		require.Contains(t, keys, key, "a case for a key the config file does not have")
		p := filepath.Join(dir, strings.ReplaceAll(key, ".", "_")+".yaml")
		require.NoError(t, os.WriteFile(p, []byte(tc.yaml+"\n"), 0o600))
		fromFile := runAgentConfig(t, "--config", p)
		require.NotEqual(t, empty, fromFile, "%s: the file's key is not read", key)
		if tc.flag == nil {
			continue
		}
		flagged[strings.TrimLeft(strings.SplitN(tc.flag[0], "=", 2)[0], "-")] = true
		if key == "gossip_key_file" {
			continue // applied by daemonSecurity: TestAgentGossipKeyFileFromConfig
		}
		require.Equal(t, fromFile, runAgentConfig(t, tc.flag...), "%s: the file and %s disagree", key, tc.flag[0])
	}
	daemonWide := map[string]bool{"config": true, "tls-dir": true, "tls-ca": true, "tls-cert": true, "tls-key": true, "insecure": true,
		"log-level": true, "log-format": true}
	for _, f := range agentCommand().Flags {
		n := f.Names()[0]
		if !flagged[n] && !daemonWide[n] {
			t.Errorf("flag --%s has no config-file key in this test: give it one (agent.Config) or mark why not", n)
		}
	}
}

// TestAgentGossipKeyFileFromConfig: the config file's gossip_key_file is
// the one used (it was ignored: the flag or /etc/shoal/gossip.key won).
func TestAgentGossipKeyFileFromConfig(t *testing.T) {
	dir := t.TempDir()
	def := filepath.Join(dir, "default.key")
	require.NoError(t, os.WriteFile(def, []byte("k\n"), 0o600))
	cfgFile := filepath.Join(dir, "agent.yaml")
	require.NoError(t, os.WriteFile(cfgFile, []byte("gossip_key_file: /srv/gossip.key\n"), 0o600))
	cfg := runAgentConfig(t, "--config", cfgFile)
	require.Equal(t, "/srv/gossip.key", gossipKeyFile("", cfg.GossipKeyFile, def), "the config file's, not the default")
	require.Equal(t, "/x.key", gossipKeyFile("/x.key", cfg.GossipKeyFile, def), "the flag wins")
	require.Equal(t, def, gossipKeyFile("", "", def), "the default when it exists")
	require.Empty(t, gossipKeyFile("", "", filepath.Join(dir, "none")))
}
