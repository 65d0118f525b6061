package spec

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const base = `apiVersion: shoal/v1
kind: Deployment
name: m
model: {source: /models/m}
engine: {kind: ray-vllm, tensorParallelSize: 8, pipelineParallelSize: 2}
resources: {nodes: 2, gpusPerNode: 8}
replicas: {count: 2}
`

func TestSeedSpec(t *testing.T) {
	b, err := os.ReadFile("../deploy/deepseek-r1.yaml")
	require.NoError(t, err)
	d, err := Parse(b)
	require.NoError(t, err)
	require.Equal(t, "deepseek-r1-671b", d.Engine.ServedModelName)
	require.Equal(t, 8, d.Engine.TensorParallelSize)
	require.Equal(t, 2, d.Engine.PipelineParallelSize)
	require.Equal(t, 1, d.DesiredReplicas(), "min replicas until the autoscaler exists")
	require.Equal(t, []string{"json", "safetensors", "py"}, d.Model.Suffixes)
	var unimpl []string
	for _, f := range d.Fields() {
		if !f.Implemented {
			unimpl = append(unimpl, f.Path)
		}
	}
	require.NotContains(t, unimpl, "autoscaling.policy", "the autoscaler acts on it")
	require.NotContains(t, unimpl, "model.source", "the agent pulls s3:// weights")
	require.NotContains(t, unimpl, "model.suffixes", "the pull filters by suffix")
	require.Equal(t, 300, d.Autoscaling.ScaleDownDelaySeconds)
}

func TestDefaults(t *testing.T) {
	d, err := Parse([]byte(`apiVersion: shoal/v1
name: small
model: {source: "hf://org/m@abc"}
resources: {nodes: 2, gpusPerNode: 4}
`))
	require.NoError(t, err)
	require.Equal(t, "Deployment", d.Kind)
	require.Equal(t, EngineRayVLLM, d.Engine.Kind)
	require.Equal(t, "small", d.Engine.ServedModelName)
	require.Equal(t, 4, d.Engine.TensorParallelSize)
	require.Equal(t, 2, d.Engine.PipelineParallelSize)
	require.Equal(t, 8000, d.Engine.Port)
	require.Equal(t, 1, d.DesiredReplicas())
}

func TestInvalid(t *testing.T) {
	cases := []struct {
		name, edit, field string
	}{
		{"unknown field", "name: m\ncolour: blue\n", `unknown field "colour"`},
		{"nested unknown", "engine: {kind: ray-vllm, tensorParallelSize: 8, pipelineParallelSize: 2, tp: 3}\n", `unknown field "tp"`},
		{"bad version", "apiVersion: v2\n", "apiVersion"},
		{"bad name", "name: Big_Model\n", "name:"},
		{"no source", "model: {path: /x}\n", "model.source"},
		{"bad source", "model: {source: ftp://x}\n", "model.source"},
		{"empty bucket", "model: {source: s3://}\n", "model.source"},
		{"bad engine", "engine: {kind: tgi}\n", "engine.kind"},
		{"tp×pp mismatch", "engine: {kind: ray-vllm, tensorParallelSize: 8, pipelineParallelSize: 1}\n", "engine.tensorParallelSize"},
		{"owned flag", "engine: {kind: ray-vllm, tensorParallelSize: 8, pipelineParallelSize: 2, args: [--port=9]}\n", "engine.args[0]"},
		{"bad port", "engine: {kind: ray-vllm, tensorParallelSize: 8, pipelineParallelSize: 2, port: 70000}\n", "engine.port"},
		{"zero nodes", "resources: {nodes: 0, gpusPerNode: 8}\n", "resources.nodes"},
		{"count and min", "replicas: {count: 2, min: 1, max: 3}\n", "replicas.count"},
		{"max < min", "replicas: {min: 3, max: 1}\n", "replicas.max"},
		{"kv target > 1", "autoscaling: {policy: kpa, metric: kv_cache_usage_perc, target: 50}\n", "autoscaling.target"},
		{"bad policy", "autoscaling: {policy: magic, metric: kv_cache_usage_perc, target: 0.5}\n", "autoscaling.policy"},
		{"count with autoscaling", "autoscaling: {policy: kpa, metric: kv_cache_usage_perc, target: 0.5}\n", "replicas.count"},
		{"panic over stable", "replicas: {min: 1, max: 3}\nautoscaling: {policy: kpa, metric: num_requests_waiting, target: 4, stableWindowSeconds: 10, panicWindowSeconds: 20}\n", "panicWindowSeconds"},
		{"wrong type", "resources: {nodes: two, gpusPerNode: 8}\n", "cannot unmarshal"},
		{"containerd without image", "engine: {kind: ray-vllm, runtime: containerd, tensorParallelSize: 8, pipelineParallelSize: 2}\n", "engine.image"},
		{"bad shm size", "engine: {kind: ray-vllm, runtime: containerd, image: vllm/vllm-openai:v0.11.0, shmSize: lots}\n", "engine.shmSize"},
		{"unknown runtime", "engine: {kind: ray-vllm, runtime: docker}\n", "engine.runtime"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse([]byte(override(base, c.edit)))
			require.ErrorIs(t, err, ErrInvalid)
			require.Contains(t, err.Error(), c.field)
		})
	}
	_, err := Parse(nil)
	require.ErrorContains(t, err, "empty")
	_, err = Parse([]byte(base + "---\n" + base))
	require.ErrorContains(t, err, "more than one")
}

// override replaces top-level keys of doc with those in edit (or appends).
func override(doc, edit string) string {
	lines := strings.Split(strings.TrimSpace(doc), "\n")
	for _, e := range strings.Split(strings.TrimSpace(edit), "\n") {
		key, _, _ := strings.Cut(e, ":")
		replaced := false
		for i, l := range lines {
			if strings.HasPrefix(l, key+":") {
				lines[i], replaced = e, true
				break
			}
		}
		if !replaced {
			lines = append(lines, e)
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

func TestJSONRoundTrip(t *testing.T) {
	d, err := Parse([]byte(base))
	require.NoError(t, err)
	d2, err := FromJSON(d.JSON())
	require.NoError(t, err)
	require.Equal(t, d, d2)
	_, err = FromJSON([]byte("{"))
	require.ErrorIs(t, err, ErrInvalid)
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	f.Add([]byte("name: [\n"))
	f.Add([]byte("&a [*a, *a]"))
	f.Add([]byte(rolesDoc))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := Parse(b)
		if err != nil {
			return
		}
		// Whatever parses must validate again after a wire round trip.
		if _, err := FromJSON(d.JSON()); err != nil {
			t.Fatalf("accepted spec fails after JSON round trip: %v", err)
		}
		if d.Roles != nil {
			// Each role runs as a deployment of its own: agents get it.
			for _, role := range []string{RolePrefill, RoleDecode} {
				if _, err := FromJSON(d.RoleDeployment(role).JSON()); err != nil {
					t.Fatalf("accepted spec's %s role fails on the wire: %v", role, err)
				}
			}
		}
	})
}

// Every rejected autoscaling or replica field is named in its error.
func TestRouterRetries(t *testing.T) {
	d, err := Parse([]byte("apiVersion: shoal/v1\nname: m\nmodel: {source: /m}\nresources: {nodes: 1, gpusPerNode: 8}\nrouter: {retries: 0}\n"))
	require.NoError(t, err)
	require.NotNil(t, d.Router.Retries)
	require.Equal(t, 0, *d.Router.Retries, "0 is kept: no retries, not the default")
}

func TestErrorsNameTheField(t *testing.T) {
	doc := "apiVersion: shoal/v1\nname: m\nmodel: {source: /m}\nresources: {nodes: 1, gpusPerNode: 8}\n"
	as := doc + "replicas: {min: 1, max: 3}\nautoscaling: {policy: kpa, metric: num_requests_waiting, target: 5, %s}\n"
	for field, text := range map[string]string{
		"autoscaling.scaleDownDelaySeconds": fmt.Sprintf(as, "scaleDownDelaySeconds: -5"),
		"autoscaling.tolerance":             fmt.Sprintf(as, "tolerance: 1.5"),
		"autoscaling.panicThreshold":        fmt.Sprintf(as, "panicThreshold: 0.5"),
		"autoscaling.maxScaleUpRate":        fmt.Sprintf(as, "maxScaleUpRate: 0.5"),
		"autoscaling.maxScaleDownRate":      fmt.Sprintf(as, "maxScaleDownRate: 0.2"),
		"autoscaling.stableWindowSeconds":   fmt.Sprintf(as, "stableWindowSeconds: -1"),
		"autoscaling.panicWindowSeconds":    fmt.Sprintf(as, "panicWindowSeconds: 90"),
		"replicas.count":                    doc + "replicas: {count: -1}\n",
		"replicas.min":                      doc + "replicas: {min: -1, max: 2}\n",
		"engine.canary":                     doc + "engine: {canary: grpc}\n",
		"router.retries":                    doc + "router: {retries: 11}\n",
	} {
		_, err := Parse([]byte(text))
		require.Error(t, err, field)
		var fe *Error
		require.True(t, errors.As(err, &fe), "%s: %v", field, err)
		require.Contains(t, err.Error(), field+":", "the error names %s", field)
		for _, other := range []string{"autoscaling.tolerance", "autoscaling.scaleDownDelaySeconds"} {
			if other != field {
				require.NotContains(t, err.Error(), other, "only the wrong field is named (%s)", field)
			}
		}
	}
}

// TestKVEventsFields: engine.kvEvents is acted on for vLLM and SGLang
// kinds, and the port only while events are on.
func TestKVEventsFields(t *testing.T) {
	field := func(y string, path string) (Field, bool) {
		d, err := Parse([]byte(y))
		require.NoError(t, err)
		for _, f := range d.Fields() {
			if f.Path == path {
				return f, true
			}
		}
		return Field{}, false
	}
	base := "apiVersion: shoal/v1\nname: k\nmodel: {source: /m}\nresources: {nodes: 1, gpusPerNode: 1}\n"
	f, ok := field(base, "engine.kvEvents")
	require.True(t, ok)
	require.Equal(t, "true", f.Value)
	require.True(t, f.Implemented)
	p, _ := field(base, "engine.kvEventsPort")
	require.Equal(t, "18000", p.Value)
	require.True(t, p.Implemented)
	f, _ = field(base+"engine: {kind: sglang, kvEvents: true}\n", "engine.kvEvents")
	require.True(t, f.Implemented, "SGLang publishes them too")
	f, _ = field(base+"engine: {kind: command, command: [x], kvEvents: true}\n", "engine.kvEvents")
	require.False(t, f.Implemented, "a command engine: stored, not acted on")
	_, ok = field(base+"engine: {kind: vllm, kvEvents: false}\n", "engine.kvEvents")
	require.False(t, ok, "off is not listed (as every false field)")
	_, ok = field(base+"engine: {kind: vllm, kvEvents: false}\n", "engine.kvEventsPort")
	require.False(t, ok, "a default port that is not used is not listed")
	p, _ = field(base+"engine: {kind: vllm, kvEvents: false, kvEventsPort: 20000}\n", "engine.kvEventsPort")
	require.False(t, p.Implemented, "a port given while events are off: stored, not acted on")
	_, ok = field(base+"engine: {kind: command, command: [x]}\n", "engine.kvEvents")
	require.False(t, ok, "not shown where it was never asked for")
	sg, err := Parse([]byte(base + "engine: {kind: sglang, args: [--disable-radix-cache]}\n"))
	require.NoError(t, err)
	on, why := KVEventsActive(sg)
	require.False(t, on)
	require.Equal(t, "engine.args set --disable-radix-cache", why)
}
