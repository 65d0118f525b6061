package sim

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPresetsReproduceTheirSources: a lone request on each calibrated preset
// shows the published TTFT (overhead + n × per-token) and ITL.
func TestPresetsReproduceTheirSources(t *testing.T) {
	for _, name := range PresetNames() {
		p := Presets[name]
		if p.PubITL == 0 {
			continue // derived preset: nothing published to match
		}
		for _, n := range []int{128, 2048} {
			r := Simulate(p.Params, n, 64, 1, 3)
			want := p.PubPrefillOverhead + time.Duration(n)*p.PubPrefillPerToken
			require.InDelta(t, float64(want), float64(r.TTFTP50), 0.01*float64(want), "%s TTFT at %d tokens", name, n)
			require.InDelta(t, float64(p.PubITL), float64(r.ITLMean), 0.02*float64(p.PubITL), "%s ITL", name)
		}
	}
}

func TestSimulateLoadRaisesITLAndThroughput(t *testing.T) {
	p := Presets["llama-8b-h100-tp1"].Params
	one := Simulate(p, 512, 128, 1, 4)
	many := Simulate(p, 512, 128, 32, 64)
	require.Greater(t, many.ITLMean, one.ITLMean)
	require.Greater(t, many.OutputTokPerSec, 5*one.OutputTokPerSec, "batching raises throughput")
	require.Equal(t, Simulate(p, 512, 128, 32, 64), many, "virtual time is deterministic")
}

func TestPresetSelection(t *testing.T) {
	p, err := presetFor("deepseek-r1-671b /models/deepseek-r1", false)
	require.NoError(t, err)
	require.Equal(t, "deepseek-r1-h200-tp8pp2", p.Name)
	p, err = presetFor("meta-llama/Llama-3.1-8B-Instruct", false)
	require.NoError(t, err)
	require.Equal(t, "llama-8b-h100-tp1", p.Name)
	t.Setenv("SHOAL_SIM_PRESET", "nope")
	_, err = presetFor("x", false)
	require.ErrorContains(t, err, "llama-70b-h100-tp8")
}
