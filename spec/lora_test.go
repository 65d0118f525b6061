package spec

import (
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/stretchr/testify/require"
)

func TestLoRAAndAdapters(t *testing.T) {
	base := "apiVersion: shoal/v1\nname: llama\nmodel: {source: /models/llama}\nresources: {nodes: 1, gpusPerNode: 1}\n"
	d, err := Parse([]byte(base + "engine: {kind: vllm, lora: {}}\nadapters:\n  - {name: sql, source: s3://loras/sql, rank: 8, maxReplicas: 2}\n"))
	require.NoError(t, err)
	require.Equal(t, &LoRA{MaxLoras: 4, MaxLoraRank: 16, MaxCPULoras: 16}, d.Engine.LoRA, "defaults")
	require.Equal(t, 16, d.Slots())
	a, ok := d.Adapter("sql")
	require.True(t, ok)
	require.Equal(t, 2, a.MaxReplicas)

	for _, tc := range []struct{ name, yaml, want string }{
		{"no lora", "engine: {kind: vllm}\nadapters: [{name: a, source: /x, rank: 8}]\n", "adapters: need engine.lora"},
		{"unknown source", "engine: {kind: vllm, lora: {}}\nadapters: [{name: a, source: ftp://x/y, rank: 8}]\n", "adapters[0].source:"},
		{"no source", "engine: {kind: vllm, lora: {}}\nadapters: [{name: a, rank: 8}]\n", "adapters[0].source: is required"},
		{"rank too large", "engine: {kind: vllm, lora: {maxLoraRank: 16}}\nadapters: [{name: a, source: /x, rank: 32}]\n", "adapters[0].rank: 32 is above the engine's largest rank, engine.lora.maxLoraRank 16"},
		{"no rank", "engine: {kind: vllm, lora: {}}\nadapters: [{name: a, source: /x}]\n", "adapters[0].rank: is required"},
		{"duplicate", "engine: {kind: vllm, lora: {}}\nadapters: [{name: a, source: /x, rank: 8}, {name: a, source: /y, rank: 8}]\n", "adapters[1].name: \"a\" is already the name of adapters[0]"},
		{"own name", "engine: {kind: vllm, lora: {}}\nadapters: [{name: llama, source: /x, rank: 8}]\n", "the deployment's own served model name"},
		{"bad name", "engine: {kind: vllm, lora: {}}\nadapters: [{name: 'a b', source: /x, rank: 8}]\n", "adapters[0].name:"},
		{"sglang", "engine: {kind: sglang, lora: {}}\n", "engine.lora: runtime LoRA adapters are supported with the vllm and ray-vllm engines"},
		{"rank choice", "engine: {kind: vllm, lora: {maxLoraRank: 20}}\n", "engine.lora.maxLoraRank: must be one of"},
		{"cpu below gpu", "engine: {kind: vllm, lora: {maxLoras: 8, maxCpuLoras: 4}}\n", "engine.lora.maxCpuLoras: must be at least maxLoras (8)"},
		{"owned flag", "engine: {kind: vllm, lora: {}, args: [--max-loras=3]}\n", "engine.args[0]: --max-loras is set by shoal from engine.lora"},
		{"negative bound", "engine: {kind: vllm, lora: {}}\nadapters: [{name: a, source: /x, rank: 8, maxReplicas: -1}]\n", "adapters[0].maxReplicas"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(base + tc.yaml))
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// engine.lora and the adapters are acted on (apply warns of no field).
func TestLoRAFieldsAreActedOn(t *testing.T) {
	d, err := Parse([]byte("apiVersion: shoal/v1\nname: llama\nmodel: {source: /models/llama}\nresources: {nodes: 1, gpusPerNode: 1}\nengine: {kind: vllm, lora: {}}\n"))
	require.NoError(t, err)
	for _, f := range d.Fields() {
		require.True(t, f.Implemented, f.Path)
	}
}

func TestWithAdapters(t *testing.T) {
	src := []byte("# my model\napiVersion: shoal/v1\nname: llama # the base\nmodel: {source: /models/llama}\nresources: {nodes: 1, gpusPerNode: 1}\nengine: {kind: vllm, lora: {}}\n")
	out, err := WithAdapters(src, []Adapter{{Name: "sql", Source: "s3://loras/sql", Rank: 8}, {Name: "chat", Source: "/a/chat", Rank: 16, MaxReplicas: 2}})
	require.NoError(t, err)
	require.Contains(t, string(out), "# my model")
	require.Contains(t, string(out), "name: llama # the base")
	d, err := Parse(out)
	require.NoError(t, err)
	require.Equal(t, []Adapter{{Name: "sql", Source: "s3://loras/sql", Rank: 8}, {Name: "chat", Source: "/a/chat", Rank: 16, MaxReplicas: 2}}, d.Adapters)

	out, err = WithAdapters(out, []Adapter{{Name: "chat", Source: "/a/chat", Rank: 16}})
	require.NoError(t, err)
	d, err = Parse(out)
	require.NoError(t, err)
	require.Equal(t, []Adapter{{Name: "chat", Source: "/a/chat", Rank: 16}}, d.Adapters)

	out, err = WithAdapters(out, nil)
	require.NoError(t, err)
	require.NotContains(t, string(out), "adapters")
	d, err = Parse(out)
	require.NoError(t, err)
	require.Empty(t, d.Adapters)

	_, err = WithAdapters([]byte("- a\n- b\n"), nil)
	require.ErrorContains(t, err, "not a YAML mapping")
	_, err = WithAdapters([]byte("a: [\n"), nil)
	require.ErrorIs(t, err, ErrInvalid)
}

// FuzzWithAdapters: any bytes give an error or a document whose adapters
// are exactly the ones set, the rest of a valid spec unchanged.
func FuzzWithAdapters(f *testing.F) {
	f.Add([]byte("apiVersion: shoal/v1\nname: llama\nmodel: {source: /m}\nresources: {nodes: 1, gpusPerNode: 1}\nengine: {kind: vllm, lora: {}}\n"))
	f.Add([]byte("adapters: [{name: a, source: /x, rank: 8}]\nname: x\n"))
	f.Add([]byte("# c\n{}"))
	f.Add([]byte("a: &x [1]\nb: *x\n"))
	ads := []Adapter{{Name: "sql", Source: "/a/sql", Rank: 8, MaxReplicas: 1}}
	f.Fuzz(func(t *testing.T, src []byte) {
		out, err := WithAdapters(src, ads)
		if err != nil {
			return
		}
		before, berr := Parse(src)
		after, aerr := Parse(out)
		if berr == nil && aerr != nil {
			before.Adapters = ads
			if before.Validate() == nil {
				t.Fatalf("a valid spec became invalid: %v\n%s", aerr, out)
			}
		}
		if berr == nil && aerr == nil {
			require.Equal(t, ads, after.Adapters)
			after.Adapters = before.Adapters
			require.Equal(t, before, after)
		}
		if !HasAdaptersKey(out) {
			var top map[string]any
			if yaml.Unmarshal(out, &top) == nil {
				t.Fatalf("the adapters key is missing from\n%s", out)
			}
		}
	})
}
