package sim

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/stretchr/testify/require"
)

// syncBuf is a goroutine-safe writer for a personality's output.
type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func freePort(t *testing.T, ip string) int { return freePorts(t, ip, 1)[0] }

// freePorts returns n distinct free ports on ip (the listeners stay open until
// all are chosen, so the kernel cannot hand one out twice).
func freePorts(t *testing.T, ip string, n int) []int {
	var out []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", ip+":0")
		require.NoError(t, err)
		defer l.Close()
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out
}

func rayStatusOf(addr string) (engine.RayStatus, error) {
	var out, errb syncBuf
	if code := Ray(context.Background(), []string{"status", "--address=" + addr}, &out, &errb); code != 0 {
		return engine.RayStatus{}, fmt.Errorf("exit %d: %s", code, errb.String())
	}
	return engine.ParseRayStatus(out.String())
}

func TestRayVLLMLaunchContract(t *testing.T) {
	t.Setenv("SHOAL_SIM_TIME_SCALE", "10")
	t.Setenv("SHOAL_SIM_LOAD_SECONDS", "1")
	t.Setenv("SHOAL_SIM_STATE_DIR", t.TempDir())
	headIP, workerIP := "127.0.9.1", "127.0.9.2"
	ports := freePorts(t, headIP, 2)
	rayPort := ports[0]
	addr := fmt.Sprintf("%s:%d", headIP, rayPort)

	// No cluster yet: `ray status` fails like Ray's.
	_, err := rayStatusOf(addr)
	require.ErrorContains(t, err, "Could not find any running Ray instance")

	headCtx, stopHead := context.WithCancel(context.Background())
	defer stopHead()
	headDone := make(chan int, 1)
	var headOut syncBuf
	go func() {
		headDone <- Ray(headCtx, []string{"start", "--head", "--node-ip-address=" + headIP, fmt.Sprintf("--port=%d", rayPort),
			"--num-gpus=8", "--disable-usage-stats", "--block"}, &headOut, &headOut)
	}()
	require.Eventually(t, func() bool { st, err := rayStatusOf(addr); return err == nil && st.TotalGPUs == 8 }, 5*time.Second, 20*time.Millisecond)

	workerCtx, stopWorker := context.WithCancel(context.Background())
	defer stopWorker()
	workerDone := make(chan int, 1)
	go func() {
		var out syncBuf
		workerDone <- Ray(workerCtx, []string{"start", "--address=" + addr, "--node-ip-address=" + workerIP,
			"--num-gpus=8", "--disable-usage-stats", "--block"}, &out, &out)
	}()
	require.Eventually(t, func() bool {
		st, err := rayStatusOf(addr)
		return err == nil && st.TotalGPUs == 16 && st.ActiveNodes == 2
	}, 5*time.Second, 20*time.Millisecond)

	serve := func(ctx context.Context, hostIP string, port int, out *syncBuf) chan int {
		t.Setenv("RAY_ADDRESS", addr)
		t.Setenv("VLLM_HOST_IP", hostIP)
		done := make(chan int, 1)
		args := []string{"serve", "/models/m", "--served-model-name", "m", "--host", headIP, "--port", fmt.Sprint(port),
			"--tensor-parallel-size", "8", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray"}
		go func() { done <- VLLM(ctx, args, out, out) }()
		return done
	}

	// vllm#7815: VLLM_HOST_IP matches no Ray node: vLLM waits for a placement
	// group that can never be placed, and never listens.
	port := ports[1]
	badCtx, stopBad := context.WithCancel(context.Background())
	var badOut syncBuf
	badDone := serve(badCtx, "127.0.9.99", port, &badOut)
	time.Sleep(1500 * time.Millisecond) // 15 virtual seconds: past the first log line
	_, err = net.DialTimeout("tcp", fmt.Sprintf("%s:%d", headIP, port), 200*time.Millisecond)
	require.Error(t, err, "a mismatched VLLM_HOST_IP must never become ready")
	require.Contains(t, badOut.String(), "Waiting for creating a placement group")
	require.Contains(t, badOut.String(), "same as VLLM_HOST_IP")
	stopBad()
	<-badDone

	// The right IP: ready after the load time, not before.
	var out syncBuf
	done := serve(context.Background(), headIP, port, &out)
	base := fmt.Sprintf("http://%s:%d", headIP, port)
	require.Eventually(t, func() bool {
		r, err := http.Get(base + "/health")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	}, 5*time.Second, 20*time.Millisecond)
	require.Contains(t, out.String(), "GPU KV cache size:")

	// A worker node dies: /health stays 200 (vllm#16259) …
	stopWorker()
	require.Equal(t, 0, <-workerDone)
	require.Eventually(t, func() bool { return strings.Contains(out.String(), "died; the engine has not noticed yet") }, 3*time.Second, 10*time.Millisecond)
	r, err := http.Get(base + "/health")
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 200, r.StatusCode)
	// … until a request runs a step: 500, then the server exits.
	r, err = http.Post(base+"/v1/completions", "application/json", strings.NewReader(`{"model":"m","prompt":"x","max_tokens":1}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 500, r.StatusCode)
	select {
	case code := <-done:
		require.Equal(t, 1, code)
	case <-time.After(5 * time.Second):
		t.Fatal("vllm did not exit after engine death")
	}
	require.Contains(t, out.String(), "EngineDeadError")

	stopHead()
	require.Equal(t, 0, <-headDone)
}

func TestRayWorkerExitsWhenHeadGoes(t *testing.T) {
	t.Setenv("SHOAL_SIM_STATE_DIR", t.TempDir())
	ip := "127.0.9.3"
	port := freePort(t, ip)
	headCtx, stopHead := context.WithCancel(context.Background())
	var b syncBuf
	headDone := make(chan int, 1)
	go func() {
		headDone <- Ray(headCtx, []string{"start", "--head", "--node-ip-address=" + ip, fmt.Sprintf("--port=%d", port), "--num-gpus=8", "--block"}, &b, &b)
	}()
	addr := fmt.Sprintf("%s:%d", ip, port)
	require.Eventually(t, func() bool { _, err := rayStatusOf(addr); return err == nil }, 5*time.Second, 20*time.Millisecond)
	workerDone := make(chan int, 1)
	var wout syncBuf
	go func() {
		workerDone <- Ray(context.Background(), []string{"start", "--address=" + addr, "--node-ip-address=127.0.9.4", "--num-gpus=8", "--block"}, &wout, &wout)
	}()
	require.Eventually(t, func() bool { st, err := rayStatusOf(addr); return err == nil && st.TotalGPUs == 16 }, 5*time.Second, 20*time.Millisecond)
	stopHead()
	<-headDone
	select {
	case code := <-workerDone:
		require.Equal(t, 1, code)
		require.Contains(t, wout.String(), "exiting")
	case <-time.After(5 * time.Second):
		t.Fatal("worker outlived its head")
	}
	var out, errb syncBuf
	require.Equal(t, 2, Ray(context.Background(), []string{"start", "--head"}, &out, &errb), "no --block")
	require.Equal(t, 2, Ray(context.Background(), []string{"launch"}, &out, &errb))
}
