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
	for _, tc := range []struct{ kind, engine, field, text string }{
		{"sglang", "kvTransfer: {connector: nixl, role: prefill}", "engine.kvTransfer", "not built yet"},
		{"vllm", "kvTransfer: {connector: mooncake, role: prefill}", "engine.kvTransfer.connector", `unknown connector "mooncake"`},
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
