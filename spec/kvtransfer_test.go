package spec

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

const pdDoc = "apiVersion: shoal/v1\nname: %s\nmodel: {source: /m}\nresources: {nodes: 1, gpusPerNode: 8}\nengine: {kind: %s, servedModelName: m, %s}\n"

func TestKVTransferDefaultsAndErrors(t *testing.T) {
	d, err := Parse([]byte(fmt.Sprintf(pdDoc, "p", "vllm", "kvTransfer: {connector: nixl, role: prefill}")))
	require.NoError(t, err)
	require.Equal(t, "fail", d.Engine.KVTransfer.FailurePolicy)
	require.Equal(t, DefaultNIXLPort, d.Engine.KVTransfer.SideChannelPort)
	d, err = Parse([]byte(fmt.Sprintf(pdDoc, "p", "sglang", "kvTransfer: {connector: mooncake, role: prefill}")))
	require.NoError(t, err)
	require.Equal(t, DefaultBootstrapPort, d.Engine.KVTransfer.BootstrapPort)
	require.Empty(t, d.Engine.KVTransfer.FailurePolicy, "vLLM's settings stay unset on SGLang")
	d, err = Parse([]byte(fmt.Sprintf(pdDoc, "p", "command, command: [x, --kv-transfer-config, '{}']", "kvTransfer: {connector: nixl, role: decode}")))
	require.NoError(t, err, "a command engine speaks vLLM's protocol; its own flags are its own")
	require.Equal(t, DefaultNIXLPort, d.Engine.KVTransfer.SideChannelPort)
	for _, tc := range []struct{ kind, engine, field, text string }{
		{"command, command: [x]", "kvTransfer: {connector: mooncake, role: prefill}", "engine.kvTransfer.connector", "speaks vLLM's NixlConnector protocol"},
		{"vllm", "kvTransfer: {connector: mooncake, role: prefill}", "engine.kvTransfer.connector", `unknown connector "mooncake" for vLLM`},
		{"vllm", "kvTransfer: {connector: nixl, role: prefill, bootstrapPort: 8998}", "engine.kvTransfer.bootstrapPort", "is SGLang's"},
		{"sglang", "kvTransfer: {connector: ucx, role: prefill}", "engine.kvTransfer.connector", "mooncake or nixl"},
		{"sglang", "kvTransfer: {connector: mooncake, role: prefill, leaseSeconds: 30}", "engine.kvTransfer.leaseSeconds", "vLLM's NixlConnector's"},
		{"sglang", "kvTransfer: {connector: mooncake, role: decode, bootstrapPort: 9000}", "engine.kvTransfer.bootstrapPort", "is the prefill engine's"},
		{"sglang", "port: 8998, kvTransfer: {connector: mooncake, role: prefill}", "engine.kvTransfer.bootstrapPort", "clash with the API server's"},
		{"sglang", "kvTransfer: {connector: nixl, role: prefill}, args: [--disaggregation-mode, prefill]", "engine.args[0]", "set by shoal from engine.kvTransfer"},
		{"vllm", "kvTransfer: {connector: nixl, role: both}", "engine.kvTransfer.role", "prefill or decode"},
		{"vllm", "kvTransfer: {connector: nixl, role: decode, failurePolicy: retry}", "engine.kvTransfer.failurePolicy", "fail or recompute"},
		{"vllm", "port: 5600, kvTransfer: {connector: nixl, role: decode}", "engine.kvTransfer.sideChannelPort", "clash with the API server's 5600-5600"},
		{"vllm", "kvTransfer: {connector: nixl, role: decode}, args: [--kv-transfer-config, '{}']", "engine.args[0]", "set by shoal from engine.kvTransfer"},
	} {
		_, err := Parse([]byte(fmt.Sprintf(pdDoc, "x", tc.kind, tc.engine)))
		require.ErrorIs(t, err, ErrInvalid)
		found := false
		for _, e := range unwrapAll(err) {
			if fe, ok := e.(*Error); ok && fe.Field == tc.field {
				require.Contains(t, fe.Msg, tc.text)
				found = true
			}
		}
		require.True(t, found, "%s: %v", tc.field, err)
	}
}

// A prefill and a decode deployment pair only when the decode engine can
// read what the prefill engine wrote.
func TestCheckPair(t *testing.T) {
	mk := func(name, engine string) *Deployment {
		d, err := Parse([]byte(fmt.Sprintf(pdDoc, name, "vllm", engine)))
		require.NoError(t, err)
		return d
	}
	p := mk("p", "tensorParallelSize: 8, kvTransfer: {connector: nixl, role: prefill}, args: [--max-model-len, '32768']")
	require.NoError(t, CheckPair(p, mk("d", "tensorParallelSize: 8, kvTransfer: {connector: nixl, role: decode}, args: ['--max-model-len=32768']")))
	err := CheckPair(p, mk("d", "tensorParallelSize: 4, pipelineParallelSize: 2, kvTransfer: {connector: nixl, role: decode}, args: [--max-model-len, '16384', --block-size, '32']"))
	require.ErrorIs(t, err, ErrInvalid)
	for _, want := range []string{"engine.args --max-model-len: prefill 32768 and decode 16384 differ", "engine.args --block-size: prefill (default) and decode 32 differ",
		"engine.tensorParallelSize: decode 4 is smaller than prefill 8", "deployments p (prefill) and d (decode) of model m"} {
		require.Contains(t, err.Error(), want)
	}
}
