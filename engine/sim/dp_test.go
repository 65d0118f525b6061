package sim

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/stretchr/testify/require"
)

func complete(base, rank string, timeout time.Duration) (int, string, error) {
	req, _ := http.NewRequest("POST", base+"/v1/completions", strings.NewReader(`{"model":"m","prompt":"hello there","max_tokens":4}`))
	req.Header.Set("Content-Type", "application/json")
	if rank != "" {
		req.Header.Set("X-data-parallel-rank", rank)
	}
	resp, err := (&http.Client{Timeout: timeout}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func scrapeEngine(t *testing.T, base string) engine.Metrics {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	m, err := engine.ParseVLLMMetrics(resp.Body)
	require.NoError(t, err)
	return m
}

// TestVLLMDataParallelHybrid: two DP processes of two ranks each (vLLM's
// hybrid load balancing), each with an API server over its own ranks; a
// request pins a rank with X-data-parallel-rank; when one process dies the
// other's ranks hang in their next collective, as MoE DP ranks do.
func TestVLLMDataParallelHybrid(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.1")
	t.Setenv("SHOAL_SIM_TIME_SCALE", "50")
	ip := "127.0.9.16"
	ps := freePorts(t, ip, 3)
	rpc, p0, p1 := ps[0], ps[1], ps[2]
	common := []string{"serve", "/m/deepseek-r1", "--served-model-name", "m", "--tensor-parallel-size", "1", "--data-parallel-size", "4",
		"--data-parallel-hybrid-lb", "--data-parallel-size-local", "2", "--data-parallel-address", ip, "--data-parallel-rpc-port", fmt.Sprint(rpc),
		"--enable-expert-parallel", "--enable-eplb", "--host", ip}
	ctx0, stop0 := context.WithCancel(context.Background())
	ctx1, stop1 := context.WithCancel(context.Background())
	defer stop1()
	var out0, out1 syncBuf
	done0, done1 := make(chan int, 1), make(chan int, 1)
	go func() {
		done0 <- VLLM(ctx0, append(common, "--data-parallel-start-rank", "0", "--port", fmt.Sprint(p0)), &out0, &out0)
	}()
	go func() {
		done1 <- VLLM(ctx1, append(common, "--data-parallel-start-rank", "2", "--port", fmt.Sprint(p1)), &out1, &out1)
	}()
	b0, b1 := fmt.Sprintf("http://%s:%d", ip, p0), fmt.Sprintf("http://%s:%d", ip, p1)
	waitHealthy(t, b0)
	waitHealthy(t, b1)
	require.Contains(t, out0.String(), "deepseek-r1-h200-dp-ep", "a DeepSeek DP + EP rank gets the wide-EP preset")
	require.Contains(t, out1.String(), "ranks 2-3 of 4")

	code, body, err := complete(b1, "3", 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, 200, code, body)
	m := scrapeEngine(t, b1)
	require.ElementsMatch(t, []string{"2", "3"}, keys(m.Ranks), "node 1's server reports its own ranks, by engine label")
	code, body, err = complete(b1, "0", 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, 400, code)
	require.Contains(t, body, "Requested DP rank 0 is out of range [2, 4)")
	for i := 0; i < 8; i++ {
		code, _, err := complete(b0, "", 10*time.Second)
		require.NoError(t, err)
		require.Equal(t, 200, code)
	}

	stop0()
	<-done0
	require.Eventually(t, func() bool { return strings.Contains(out1.String(), "ranks hang") }, 5*time.Second, 20*time.Millisecond)
	_, _, err = complete(b1, "", 500*time.Millisecond)
	require.Error(t, err, "a wedged rank answers nothing")
	select {
	case <-done1:
		t.Fatal("a wedged DP process does not exit by itself: the agent stops it")
	default:
	}
	stop1()
	<-done1
}

// TestVLLMDataParallelExternal: one process and port per rank; the rank-0
// process is the DP coordinator, and a rank that dies wedges it.
func TestVLLMDataParallelExternal(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.1")
	t.Setenv("SHOAL_SIM_TIME_SCALE", "50")
	ip := "127.0.9.17"
	ps := freePorts(t, ip, 3)
	common := []string{"serve", "/m", "--served-model-name", "m", "--tensor-parallel-size", "4", "--data-parallel-size", "2",
		"--data-parallel-address", ip, "--data-parallel-rpc-port", fmt.Sprint(ps[0]), "--host", ip}
	ctx0, stop0 := context.WithCancel(context.Background())
	defer stop0()
	ctx1, stop1 := context.WithCancel(context.Background())
	var out0, out1 syncBuf
	done0, done1 := make(chan int, 1), make(chan int, 1)
	go func() {
		done0 <- VLLM(ctx0, append(common, "--data-parallel-rank", "0", "--port", fmt.Sprint(ps[1])), &out0, &out0)
	}()
	go func() {
		done1 <- VLLM(ctx1, append(common, "--data-parallel-rank", "1", "--port", fmt.Sprint(ps[2])), &out1, &out1)
	}()
	b0, b1 := fmt.Sprintf("http://%s:%d", ip, ps[1]), fmt.Sprintf("http://%s:%d", ip, ps[2])
	waitHealthy(t, b0)
	waitHealthy(t, b1)
	code, _, err := complete(b1, "", 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, 200, code)
	require.Equal(t, []string{"1"}, keys(scrapeEngine(t, b1).Ranks))
	stop1()
	<-done1
	require.Eventually(t, func() bool { return strings.Contains(out0.String(), "ranks hang") }, 5*time.Second, 20*time.Millisecond)
	stop0()
	<-done0
}

func keys(m map[string]engine.RankLoad) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// vLLM's refusals of DP and EP combinations, in its words.
func TestVLLMDataParallelRefusals(t *testing.T) {
	base := []string{"serve", "/m", "--data-parallel-size", "4"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--data-parallel-hybrid-lb", "--data-parallel-size-local", "2", "--headless"}, "not applicable in headless mode"},
		{[]string{"--data-parallel-hybrid-lb"}, "data_parallel_size_local must be set"},
		{[]string{"--data-parallel-start-rank", "2", "--data-parallel-size-local", "2"}, "only applicable in headless or hybrid mode"},
		{[]string{"--enable-eplb"}, "enable_expert_parallel must be True to use EPLB"},
		{[]string{"--enable-expert-parallel", "--all2all-backend", "nccl"}, "invalid choice: 'nccl'"},
		{[]string{"--data-parallel-rank", "4"}, "must be less than data_parallel_size"},
		{[]string{"--data-parallel-size-local", "3"}, "do not describe whole nodes"},
		{[]string{"--enable-expert-parallel", "--enable-eplb", "--eplb-config", `{"window":1}`}, "--eplb-config"},
		{[]string{"--headless", "--api-server-count", "2", "--data-parallel-size-local", "2", "--data-parallel-start-rank", "2"}, "--api-server-count cannot be used with --headless"},
	} {
		var out, errb syncBuf
		code := VLLM(context.Background(), append(append([]string{}, base...), tc.args...), &out, &errb)
		require.NotEqual(t, 0, code, tc.args)
		require.Contains(t, errb.String(), tc.want, tc.args)
	}
	var out, errb syncBuf
	t.Setenv("SHOAL_SIM_GPUS", "8")
	require.Equal(t, 1, VLLM(context.Background(), []string{"serve", "/m", "-tp", "4", "-dp", "4", "-dpl", "4"}, &out, &errb))
	require.Contains(t, errb.String(), "DP adjusted local world size 16")
}

// The EP cost per step, by its terms.
func TestEPCostStepTime(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		c      *EPCost
		tokens int
		want   time.Duration
	}{
		{nil, 100, 10 * ms},
		{&EPCost{Nodes: 1, A2ALatency: ms, A2APerToken: 10 * time.Microsecond, Imbalance: 1}, 100, 11 * ms}, // NVLink only: no off-node share
		{&EPCost{Nodes: 2, A2ALatency: ms, A2APerToken: 10 * time.Microsecond, Imbalance: 1}, 100, 11*ms + 500*time.Microsecond},
		{&EPCost{Nodes: 4, A2ALatency: ms, A2APerToken: 10 * time.Microsecond, Imbalance: 1.5}, 100, 16*ms + 750*time.Microsecond},
	} {
		require.Equal(t, tc.want, tc.c.stepTime(10*ms, tc.tokens), "%+v", tc.c)
	}
}

// With EP the ranks step in lockstep: a lightly loaded rank's tokens come
// at the pace of the busiest rank's steps.
func TestDPRanksLockstep(t *testing.T) {
	p := Presets["deepseek-r1-h200-dp-ep"].Params
	p.EP = &EPCost{Nodes: 2, A2ALatency: 4 * time.Millisecond, A2APerToken: 20 * time.Microsecond, Imbalance: 1}
	g := newDPRanks(serveConfig{served: "m"}, p, Clock{Scale: math.Inf(1)}, 2, 0)
	ctx := context.Background()
	add := func(e *Engine, n int) {
		for i := 0; i < n; i++ {
			require.NoError(t, e.submit(&request{prompt: 16, origPrompt: 16, maxTokens: 64, natural: 65, ignoreEOS: true, out: make(chan token, 70), ctx: ctx}))
		}
	}
	add(g.engines[0], 200)
	add(g.engines[1], 1)
	var waves []time.Duration
	for i := 0; i < 10; i++ {
		waves = append(waves, g.wave(func(time.Duration) {}))
	}
	alone := p.EP.stepTime(p.Base+p.DecodePerSeq+17*p.PerContextToken, 1)
	for _, d := range waves[2:] {
		require.Greater(t, d, 2*alone, "the light rank waits for the heavy one")
	}
	g.engines[0].mu.Lock()
	v0 := g.engines[0].vnow
	g.engines[0].mu.Unlock()
	g.engines[1].mu.Lock()
	v1 := g.engines[1].vnow
	g.engines[1].mu.Unlock()
	require.Equal(t, v0, v1, "one clock for the wave")
}

// The wide-EP preset reproduces the figure it was fitted to: a full decode
// batch of 3k-token sequences on 2 nodes gives ~2.2k tokens/s per GPU.
func TestWideEPPresetCalibration(t *testing.T) {
	pr := Presets["deepseek-r1-h200-dp-ep"]
	p := pr.withEP(pr.Params, 2, true, 32, 16)
	n := pr.PubDecodeSeqs
	step := p.Base + time.Duration(n)*p.DecodePerSeq + time.Duration(n*pr.PubContext)*p.PerContextToken
	step = p.EP.stepTime(step, n)
	perGPU := float64(n) / step.Seconds()
	require.InEpsilon(t, pr.PubOutTokPerGPU, perGPU, 0.03, "step %v", step)
	require.Less(t, p.NumGPUBlocks, pr.Params.NumGPUBlocks, "EPLB's redundant experts take KV room")
	noLB := pr.withEP(pr.Params, 2, false, 0, 16)
	require.Equal(t, 1.25, noLB.EP.Imbalance)
}
