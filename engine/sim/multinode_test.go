package sim

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/stretchr/testify/require"
)

func waitHealthy(t *testing.T, base string) {
	t.Helper()
	require.Eventually(t, func() bool {
		r, err := http.Get(base + "/health")
		if err == nil {
			r.Body.Close()
		}
		return err == nil && r.StatusCode == 200
	}, 5*time.Second, 20*time.Millisecond)
}

// TestVLLMNativeMultiNode: rank 0 serves HTTP once the headless rank joined;
// the headless rank runs no API server and, like vLLM (vllm#32136), does not
// exit when the head goes away.
func TestVLLMNativeMultiNode(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.1")
	ip := "127.0.9.6"
	ps := freePorts(t, ip, 2)
	master, port := ps[0], ps[1]
	common := []string{"serve", "/m", "--served-model-name", "m", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
		"--nnodes", "2", "--master-addr", ip, "--master-port", fmt.Sprint(master)}
	headCtx, stopHead := context.WithCancel(context.Background())
	var hout, wout syncBuf
	headDone := make(chan int, 1)
	go func() {
		headDone <- VLLM(headCtx, append(common, "--node-rank", "0", "--host", ip, "--port", fmt.Sprint(port)), &hout, &hout)
	}()
	time.Sleep(300 * time.Millisecond)
	_, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", ip, port), 100*time.Millisecond)
	require.Error(t, err, "not ready before all nodes joined")

	workerCtx, stopWorker := context.WithCancel(context.Background())
	defer stopWorker()
	workerDone := make(chan int, 1)
	go func() { workerDone <- VLLM(workerCtx, append(common, "--node-rank", "1", "--headless"), &wout, &wout) }()
	waitHealthy(t, fmt.Sprintf("http://%s:%d", ip, port))
	require.Contains(t, hout.String(), "rank 1 joined")

	stopHead()
	<-headDone
	select {
	case <-workerDone:
		t.Fatal("a headless rank must outlive its head (vllm#32136): the agent has to stop it")
	case <-time.After(500 * time.Millisecond):
	}
	stopWorker()
	<-workerDone

	var out, errb syncBuf
	require.Equal(t, 1, VLLM(context.Background(), append(common, "--node-rank", "1"), &out, &errb), "rank 1 needs --headless")
	require.Contains(t, errb.String(), "--headless")
	require.Equal(t, 1, VLLM(context.Background(), append(common, "--node-rank", "5", "--headless"), &out, &errb))
}

// TestSGLangMultiNode: python3 -m sglang.launch_server with --nnodes 2; rank 0
// serves HTTP, /metrics has SGLang's names (only with --enable-metrics), and
// the agent's parser reads them.
func TestSGLangMultiNode(t *testing.T) {
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "0.1")
	ip := "127.0.9.7"
	ps := freePorts(t, ip, 2)
	dist, port := ps[0], ps[1]
	common := []string{"--model-path", "/m", "--served-model-name", "m", "--tp", "16", "--dist-init-addr", fmt.Sprintf("%s:%d", ip, dist),
		"--nnodes", "2", "--host", ip, "--port", fmt.Sprint(port), "--enable-metrics"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuf
	done0, done1 := make(chan int, 1), make(chan int, 1)
	go func() {
		done0 <- Main(ctx, append([]string{"python3", "-m", "sglang.launch_server"}, append(common, "--node-rank", "0")...), &out, &out)
	}()
	go func() {
		done1 <- Main(ctx, append([]string{"shoal-sim", "sglang"}, append(common, "--node-rank", "1")...), &out, &out)
	}()
	base := fmt.Sprintf("http://%s:%d", ip, port)
	waitHealthy(t, base)
	resp, body := post(t, base+"/v1/completions", `{"model":"m","prompt":"hello","max_tokens":3}`)
	require.Equal(t, 200, resp.StatusCode, body)
	r, err := http.Get(base + "/v1/models")
	require.NoError(t, err)
	r.Body.Close()
	mr, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	defer mr.Body.Close()
	m, err := engine.ParseVLLMMetrics(mr.Body)
	require.NoError(t, err)
	require.Equal(t, 3.0, m.GenerationTokens, "SGLang names parsed: %+v", m)
	cancel()
	<-done0
	<-done1

	var o, e syncBuf
	require.Equal(t, 2, Main(context.Background(), []string{"python3", "-c", "print(1)"}, &o, &e))
	require.Equal(t, 2, SGLang(context.Background(), []string{"--tp", "8"}, &o, &e))
	require.Contains(t, e.String(), "--model-path")
}
