package sim

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A lone request's TTFT, exactly: colocated, one step that prefills the
// prompt and makes the first token; disaggregated, that step on the
// prefill engine, the router's hop, the KV's bytes over the link (and the
// handshake of a new pair), then the decode engine's step over the
// prompt's last partial block.
func TestSimulateServingLoneRequest(t *testing.T) {
	p := DefaultParams()
	const prompt = 1000
	step := func(prefill int) time.Duration {
		return p.Base + time.Duration(prefill)*p.PrefillPerToken + p.DecodePerSeq + time.Duration(prompt)*p.PerContextToken + p.PrefillOverhead
	}
	xfer := time.Duration(float64(prompt*(128<<10)) / 50e9 * float64(time.Second))
	rest := prompt - (prompt-1)/p.BlockSize*p.BlockSize // the decode engine computes what is not a whole pulled block
	cases := []struct {
		name string
		s    Serving
		want time.Duration
	}{
		{"colocated", Serving{Params: p, Colocated: 1}, step(prompt)},
		{"disaggregated, warm pair", Serving{Params: p, Prefill: 1, Decode: 1, KVBytesPerToken: 128 << 10, LinkGBps: 50, Hop: time.Millisecond},
			step(prompt) + time.Millisecond + xfer + step(rest)},
		{"disaggregated, lazy handshake", Serving{Params: p, Prefill: 1, Decode: 1, KVBytesPerToken: 128 << 10, LinkGBps: 50, Hop: time.Millisecond, Handshake: 5 * time.Second},
			step(prompt) + time.Millisecond + xfer + 5*time.Second + step(rest)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := SimulateServing(c.s, Load{Rate: 1, Prompt: prompt, Output: 4, Total: 1, Seed: 1}, SLO{TTFT: time.Hour, ITL: time.Hour})
			require.Equal(t, 1, r.Requests)
			require.Equal(t, c.want, r.TTFTP50)
			require.InDelta(t, 1.0, r.Goodput*r.Duration.Seconds(), 1e-9, "the one request met the SLO")
		})
	}
}

// The same seed gives the same run; the prefill engine's blocks are held
// for the transfer and freed after it; every request is decoded in full.
func TestSimulateServingRepeatable(t *testing.T) {
	s := Serving{Params: Presets["llama-8b-h100-tp1"].Params, Prefill: 1, Decode: 2, KVBytesPerToken: 128 << 10, LinkGBps: 3}
	l := Load{Rate: 4, Prompt: 2048, Output: 64, Total: 80, Seed: 7}
	a := SimulateServing(s, l, SLO{TTFT: 2 * time.Second, ITL: 50 * time.Millisecond})
	b := SimulateServing(s, l, SLO{TTFT: 2 * time.Second, ITL: 50 * time.Millisecond})
	require.Equal(t, a, b)
	require.Equal(t, 80, a.Requests)
	require.InDelta(t, 64*80/a.Duration.Seconds(), a.OutTokPerSec, 1e-6, "every output token came from the decode engines")
	require.InDelta(t, 2048*80/a.Duration.Seconds(), a.PromptTokPerSec, 1e-6, "prompts computed once, on the prefill engine")
	require.Positive(t, a.Goodput)
}
