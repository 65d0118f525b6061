package engine

import (
	"encoding/json"
	"strconv"
	"strings"

	"github.com/shoalhq/shoal/spec"
)

// kvTransferArgs is vLLM's --kv-transfer-config for engine.kvTransfer
// (docs/design/pd.md §P1): the NixlConnector, kv_both (the router, not the
// flag, decides who prefills), the load-failure policy and the lease.
func kvTransferArgs(s *spec.Deployment) []string {
	k := s.Engine.KVTransfer
	if k == nil {
		return nil
	}
	cfg := struct {
		Connector string         `json:"kv_connector"`
		Role      string         `json:"kv_role"`
		Policy    string         `json:"kv_load_failure_policy"`
		Extra     map[string]int `json:"kv_connector_extra_config,omitempty"`
	}{Connector: "NixlConnector", Role: "kv_both", Policy: k.FailurePolicy}
	if k.LeaseSeconds > 0 {
		cfg.Extra = map[string]int{"kv_lease_duration": k.LeaseSeconds}
	}
	b, _ := json.Marshal(cfg)
	return []string{"--kv-transfer-config", string(b)}
}

// nixlEnv sets what the NixlConnector needs: its side channel on the
// node's own address (vLLM's default, localhost, cannot be reached from
// the other host of a pair), its base port (each DP rank adds its rank),
// and UCX on the HCAs the RDMA scan found.
func nixlEnv(s *spec.Deployment, env map[string]string, nodeIP string) {
	k := s.Engine.KVTransfer
	switch {
	case k == nil:
		return
	case s.Engine.Kind == spec.EngineSGLang:
		if k.Connector == spec.ConnectorNIXL {
			ucxEnv(s, env)
		} else {
			// Mooncake's TCP transport reuses connections (GPUStack found
			// TIME_WAIT exhausting ports within seconds without it).
			setDefault(s, env, "MC_TCP_ENABLE_CONNECTION_POOL", "1")
		}
		return
	}
	setDefault(s, env, "VLLM_NIXL_SIDE_CHANNEL_HOST", nodeIP)
	setDefault(s, env, "VLLM_NIXL_SIDE_CHANNEL_PORT", strconv.Itoa(k.SideChannelPort))
	ucxEnv(s, env)
}

// ucxEnv points NIXL's UCX at the right devices (NCCL's variables do not
// apply to it): the HCAs the RDMA scan found (every transport, as vLLM's
// guide configures UCX), or without RDMA TCP on the interface of the
// node's own address plus the GPU copies — left to itself UCX may pick a
// bridge such as docker0 and the handshake fails.
func ucxEnv(s *spec.Deployment, env map[string]string) {
	if hcas := rdmaHCAs(env); hcas != "" {
		setDefault(s, env, "UCX_NET_DEVICES", hcas)
		return
	}
	if ifn := env["NCCL_SOCKET_IFNAME"]; ifn != "" {
		setDefault(s, env, "UCX_NET_DEVICES", ifn)
		setDefault(s, env, "UCX_TLS", "tcp,cuda_copy,cuda_ipc")
	}
}

// transferEnv is the environment of expert parallelism's all-to-all and
// of the KV connector, for every engine process of the node (and, for
// ray-vllm, every node's `ray start`, whose workers inherit it).
func transferEnv(s *spec.Deployment, env map[string]string, nodeIP string) {
	epEnv(s, env)
	nixlEnv(s, env, nodeIP)
}

// sglangDisaggArgs are SGLang's disaggregation flags for engine.kvTransfer
// (docs/design/pd.md §P2), on every node of the group: the role, the
// transfer backend, the prefill engine's bootstrap port, and the RDMA
// devices the scan found (by name, without NCCL's port suffix).
func sglangDisaggArgs(s *spec.Deployment, env map[string]string) []string {
	k := s.Engine.KVTransfer
	if k == nil {
		return nil
	}
	args := []string{"--disaggregation-mode", k.Role, "--disaggregation-transfer-backend", k.Connector}
	if k.Role == spec.RolePrefill {
		args = append(args, "--disaggregation-bootstrap-port", strconv.Itoa(k.BootstrapPort))
	}
	if hcas := rdmaHCAs(env); hcas != "" {
		var devs []string
		for _, h := range strings.Split(hcas, ",") {
			if d, _, _ := strings.Cut(strings.TrimSpace(h), ":"); d != "" {
				devs = append(devs, d)
			}
		}
		args = append(args, "--disaggregation-ib-device", strings.Join(devs, ","))
	}
	return args
}
