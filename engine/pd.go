package engine

import (
	"encoding/json"
	"strconv"

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
	if k == nil {
		return
	}
	setDefault(s, env, "VLLM_NIXL_SIDE_CHANNEL_HOST", nodeIP)
	setDefault(s, env, "VLLM_NIXL_SIDE_CHANNEL_PORT", strconv.Itoa(k.SideChannelPort))
	setDefault(s, env, "UCX_NET_DEVICES", rdmaHCAs(env))
}

// transferEnv is the environment of expert parallelism's all-to-all and
// of the KV connector, for every engine process of the node (and, for
// ray-vllm, every node's `ray start`, whose workers inherit it).
func transferEnv(s *spec.Deployment, env map[string]string, nodeIP string) {
	epEnv(s, env)
	nixlEnv(s, env, nodeIP)
}
