// Package e2e runs shoal as a user does: the real binaries as separate
// processes on loopback addresses, driven through the CLI and OpenAI clients.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/internal/testbin"
	"github.com/stretchr/testify/require"
)

var binDir string

func TestMain(m *testing.M) { testbin.Main(m, &binDir) }

// freeAddrs returns n distinct free addresses on ip: the listeners stay open
// until all are chosen, so the kernel cannot hand the same port out twice.
func freeAddrs(t *testing.T, ip string, n int) []string {
	t.Helper()
	var out []string
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", ip+":0")
		require.NoError(t, err)
		defer l.Close()
		out = append(out, l.Addr().String())
	}
	return out
}

type env struct {
	t      *testing.T
	c      *devcluster.Cluster
	api    string
	router string
	dir    string
	gossip string // the coordinator's gossip address
}

// startCluster starts a coordinator and n agents on 127.0.<subnet>.x; opts
// adjust the cluster's config.
func startCluster(t *testing.T, subnet, n int, opts ...func(*devcluster.Config)) *env {
	ip := fmt.Sprintf("127.0.%d.1", subnet)
	dir := t.TempDir()
	addrs := freeAddrs(t, ip, 3)
	e := &env{t: t, api: addrs[0], router: addrs[1], dir: dir}
	port := addrs[2]
	_, p, _ := net.SplitHostPort(port)
	var gp int
	fmt.Sscan(p, &gp)
	e.gossip = port
	cfg := devcluster.Config{Dir: dir, ShoalBin: filepath.Join(binDir, "shoal"), SimBin: filepath.Join(binDir, "shoal-sim"),
		Agents: n, IPPrefix: fmt.Sprintf("127.0.%d.", subnet), FirstIP: 2, CoordIP: ip, GossipPort: gp, APIAddr: e.api, RouterAddr: e.router,
		SimEnv: []string{"SHOAL_SIM_LOAD_SECONDS=1"}}
	for _, o := range opts {
		o(&cfg)
	}
	e.api, e.router = cfg.APIAddr, cfg.RouterAddr
	e.gossip = net.JoinHostPort(cfg.CoordIP, strconv.Itoa(cfg.GossipPort))
	for i, s := range cfg.Servers {
		if i > 0 {
			e.gossip += "," + net.JoinHostPort(s.IP, strconv.Itoa(s.Gossip))
		}
	}
	c, err := devcluster.Start(cfg)
	require.NoError(t, err)
	e.c = c
	t.Cleanup(func() {
		c.Stop()
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(dir, "logs", "*.log"))
			for _, p := range logs {
				f := strings.TrimSuffix(filepath.Base(p), ".log")
				b, _ := os.ReadFile(p)
				lines := strings.Split(string(b), "\n")
				t.Logf("---- %s (last lines)\n%s", f, strings.Join(lines[max(0, len(lines)-25):], "\n"))
			}
		}
	})
	return e
}

// shoal runs the CLI against the test coordinator.
func (e *env) shoal(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
	if e.c != nil {
		cmd.Env = append(os.Environ(), e.c.ClientEnv()...)
	} else {
		cmd.Env = append(os.Environ(), "SHOAL_INSECURE=1", "SHOAL_COORDINATOR="+e.api)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

type replica struct {
	GroupID  string   `json:"groupId"`
	Epoch    string   `json:"epoch"`
	State    string   `json:"state"`
	Head     string   `json:"head"`
	Endpoint string   `json:"endpoint"`
	Members  []string `json:"members"`
	Outdated bool     `json:"outdated"`
}

func (e *env) replicas() []replica {
	out, err := e.shoal("get", "replicas", "-o", "json")
	if err != nil {
		return nil
	}
	var r struct {
		Replicas []replica `json:"replicas"`
	}
	if json.Unmarshal([]byte(out), &r) != nil {
		return nil
	}
	return r.Replicas
}

type nodeInfo struct {
	NodeID  string `json:"nodeId"`
	Address string `json:"address"`
	Role    string `json:"role"`
	GroupID string `json:"groupId"`
	State   string `json:"state"`
}

func (e *env) nodes() []nodeInfo {
	out, err := e.shoal("get", "nodes", "-o", "json")
	require.NoError(e.t, err, out)
	var r struct {
		Nodes []nodeInfo `json:"nodes"`
	}
	require.NoError(e.t, json.Unmarshal([]byte(out), &r), out)
	return r.Nodes
}

func readyCount(rs []replica) int {
	n := 0
	for _, r := range rs {
		if r.State == "ready" {
			n++
		}
	}
	return n
}

const spec2x2 = `apiVersion: shoal/v1
kind: Deployment
name: demo
model: {source: /models/demo}
engine: {kind: ray-vllm, servedModelName: demo, tensorParallelSize: 8, pipelineParallelSize: 2, startupTimeoutSeconds: 60}
resources: {nodes: 2, gpusPerNode: 8, gpuModel: H200}
replicas: {count: 2}
`

// TestClusterServesAndRecovers is the core scenario: 5 agents, a 2×2
// deployment applied through the CLI, completions through the router with the
// official OpenAI Go client, then a worker host dies (agent and engines
// SIGKILLed): the router must stop sending to that replica within 5 s and
// the group must re-form on the spare node under a new epoch and serve again.
func TestClusterServesAndRecovers(t *testing.T) {
	e := startCluster(t, 7, 5)
	specFile := filepath.Join(e.dir, "demo.yaml")
	require.NoError(t, os.WriteFile(specFile, []byte(spec2x2), 0o644))
	require.Eventually(t, func() bool {
		out, err := e.shoal("apply", "-f", specFile)
		return err == nil && strings.Contains(out, "deployment/demo created")
	}, 20*time.Second, 200*time.Millisecond)

	start := time.Now()
	if !assertEventually(func() bool { return readyCount(e.replicas()) == 2 }, 60*time.Second) {
		out, _ := e.shoal("get", "replicas", "-o", "json")
		out2, _ := e.shoal("get", "nodes")
		t.Fatalf("replicas not ready:\n%s\n%s", out, out2)
	}
	t.Logf("2 replicas ready %.1fs after apply", time.Since(start).Seconds())

	// The official OpenAI Go client, non-streaming and streaming.
	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	params := openai.ChatCompletionNewParams{Model: "demo", MaxTokens: openai.Int(12),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello from a simulated H200.")}}
	resp, err := client.Chat.Completions.New(ctx, params)
	require.NoError(t, err)
	require.Len(t, resp.Choices, 1)
	require.NotEmpty(t, resp.Choices[0].Message.Content)
	require.Equal(t, int64(12), resp.Usage.CompletionTokens)
	require.Equal(t, "length", string(resp.Choices[0].FinishReason))

	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	stream := client.Chat.Completions.NewStreaming(ctx, params)
	acc := openai.ChatCompletionAccumulator{}
	chunks := 0
	for stream.Next() {
		acc.AddChunk(stream.Current())
		chunks++
	}
	require.NoError(t, stream.Err())
	require.GreaterOrEqual(t, chunks, 13, "role chunk + 12 tokens (+ usage)")
	require.NotEmpty(t, acc.Choices[0].Message.Content)
	require.Equal(t, int64(12), acc.Usage.CompletionTokens)

	// Only heads serve the Replica API: a worker's port is closed.
	var worker, head, spare nodeInfo
	for _, n := range e.nodes() {
		switch {
		case n.State == "idle":
			spare = n
		case n.Role == "worker" && worker.NodeID == "":
			worker = n
		case n.Role == "head" && head.NodeID == "":
			head = n
		}
	}
	require.NotEmpty(t, worker.NodeID)
	require.NotEmpty(t, head.NodeID)
	require.NotEmpty(t, spare.NodeID, "one of 5 nodes stays spare")
	c, err := net.DialTimeout("tcp", worker.Address+":7948", time.Second)
	require.Error(t, err, "worker replica port must be closed")
	c, err = net.DialTimeout("tcp", head.Address+":7948", time.Second)
	require.NoError(t, err, "head replica port must be open")
	c.Close()

	// Kill the worker's host: agent and engines, SIGKILL.
	victim := worker.GroupID
	var victimEpoch string
	for _, r := range e.replicas() {
		if r.GroupID == victim {
			victimEpoch = r.Epoch
		}
	}
	require.NoError(t, e.c.Kill(worker.NodeID))
	killed := time.Now()
	// Watch, concurrently with the traffic below, for the re-formed replica.
	reformedCh := make(chan replica, 1)
	go func() {
		for time.Since(killed) < 60*time.Second {
			for _, r := range e.replicas() {
				if r.GroupID == victim && r.Epoch != victimEpoch && r.State == "ready" {
					reformedCh <- r
					return
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
		close(reformedCh)
	}()
	var reformed replica
	var reformedAt time.Time

	// Drive traffic; record when the router last answered from the dead epoch.
	lastDead, lastFail := time.Time{}, time.Time{}
	hc := &http.Client{Timeout: 10 * time.Second}
	for time.Since(killed) < 8*time.Second {
		select {
		case r, ok := <-reformedCh:
			if ok {
				reformed, reformedAt = r, time.Now()
			}
		default:
		}
		req, _ := http.NewRequest("POST", "http://"+e.router+"/v1/chat/completions",
			strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`))
		req.Header.Set("routing-strategy", "random")
		r, err := hc.Do(req)
		now := time.Now()
		if err != nil {
			lastFail = now
			continue
		}
		r.Body.Close()
		if r.Header.Get("X-Shoal-Replica") == victim && r.Header.Get("X-Shoal-Epoch") == victimEpoch {
			lastDead = now
		}
		if r.StatusCode != 200 {
			lastFail = now
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !lastDead.IsZero() {
		t.Logf("router last answered from the dead replica %.2fs after the kill", lastDead.Sub(killed).Seconds())
		require.Less(t, lastDead.Sub(killed), 5*time.Second, "router kept routing to the dead replica")
	} else {
		t.Logf("router never answered from the dead replica after the kill")
	}
	if !lastFail.IsZero() {
		require.Less(t, lastFail.Sub(killed), 5*time.Second, "requests still failed 5 s after the kill")
		t.Logf("last failed request %.2fs after the kill", lastFail.Sub(killed).Seconds())
	}

	// The group re-forms on the spare under a new epoch and serves again.
	if reformedAt.IsZero() {
		r, ok := <-reformedCh
		require.True(t, ok, "replica %s was not re-formed within 60 s", victim)
		reformed, reformedAt = r, time.Now()
	}
	t.Logf("RECOVERY: replica %s re-formed at epoch %s on %v and ready %.2fs after the kill (simulated load 1 s)",
		victim, reformed.Epoch, reformed.Members, reformedAt.Sub(killed).Seconds())
	require.NotContains(t, reformed.Members, worker.NodeID)
	require.Contains(t, reformed.Members, spare.NodeID, "the spare node replaces the dead one")
	require.Eventually(t, func() bool {
		req, _ := http.NewRequest("POST", "http://"+e.router+"/v1/completions", strings.NewReader(`{"model":"demo","prompt":"hi","max_tokens":2}`))
		req.Header.Set("routing-strategy", "random")
		r, err := hc.Do(req)
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200 && r.Header.Get("X-Shoal-Replica") == victim && r.Header.Get("X-Shoal-Epoch") == reformed.Epoch
	}, 10*time.Second, 50*time.Millisecond, "the re-formed replica serves through the router")

	out, err := e.shoal("describe", "deployment", "demo")
	require.NoError(t, err)
	require.Contains(t, out, "re-formed at epoch")
	require.Contains(t, out, "(gone from gossip; ", "the re-form says what confirmed the loss")

	// Deleting the deployment releases every node.
	out, err = e.shoal("delete", "deployment", "demo")
	require.NoError(t, err, out)
	require.Eventually(t, func() bool {
		for _, n := range e.nodes() {
			if n.State != "idle" {
				return false
			}
		}
		return true
	}, 30*time.Second, 200*time.Millisecond)
	r, err := hc.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"x"}`))
	require.NoError(t, err)
	r.Body.Close()
	require.Equal(t, 404, r.StatusCode, "a deleted model is unknown")
}

// TestCLIErrors: bad input through the CLI gets a clear error, never a crash.
func TestCLIErrors(t *testing.T) {
	e := &env{t: t, api: "127.0.0.1:1"}
	out, err := e.shoal("get", "nodes")
	require.Error(t, err)
	require.Contains(t, out, "cannot reach the coordinator")
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte(strings.Replace(spec2x2, "gpusPerNode: 8", "gpusPerNode: 8, colour: red", 1)), 0o644))
	out, err = e.shoal("apply", "-f", bad)
	require.Error(t, err)
	require.Contains(t, out, `unknown field "colour"`)
	out, err = e.shoal("get", "pods")
	require.Error(t, err)
	require.Contains(t, out, "nodes, deployments, replicas")

	// Secure by default: daemons without certificates or a gossip key refuse
	// to start and say how to fix it; the CLI without credentials too.
	run := func(env []string, args ...string) (string, error) {
		cmd := exec.Command(filepath.Join(binDir, "shoal"), args...)
		// Nothing of this host's: no ~/.shoal, no /etc/shoal (an installed
		// package), no running `shoal dev`.
		cmd.Env = append(append(os.Environ(), "HOME="+t.TempDir(), "TMPDIR="+t.TempDir(), "SHOAL_CONFIG_DIR="+t.TempDir()), env...)
		b, err := cmd.CombinedOutput()
		return string(b), err
	}
	noTLS := t.TempDir()
	out, err = run(nil, "agent", "--address", "127.0.0.1", "--tls-dir", noTLS, "--gpu-backend", "none")
	require.Error(t, err)
	require.Contains(t, out, "shoal tls ca create")
	require.Contains(t, out, "--insecure")
	out, err = run(nil, "coordinator", "--tls-dir", noTLS, "--no-api-keys")
	require.Error(t, err)
	require.Contains(t, out, "--insecure")
	out, err = run(nil, "coordinator", "--api", "0.0.0.0:8080", "--router", "127.0.0.1:8080", "--insecure", "--no-api-keys")
	require.Error(t, err)
	require.Contains(t, out, "share a port")
	// Closed by default: a router without API keys does not start.
	out, err = run(nil, "router", "--listen", "127.0.0.1:1", "--backend", "m=127.0.0.1:2")
	require.Error(t, err)
	require.Contains(t, out, "the router would serve anyone")
	require.Contains(t, out, "shoal apikey create")
	out, err = run(nil, "coordinator", "--insecure", "--api", "127.0.0.1:1", "--router", "127.0.0.1:2")
	require.Error(t, err)
	require.Contains(t, out, "--no-api-keys")
	out, err = run([]string{"SHOAL_COORDINATOR=127.0.0.1:1"}, "get", "nodes")
	require.Error(t, err)
	require.Contains(t, out, "no CLI credentials")
}

func assertEventually(f func() bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if f() {
			return true
		}
		time.Sleep(200 * time.Millisecond)
	}
	return false
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

// apply writes a spec into the cluster's directory and applies it through
// the CLI, retrying while the coordinator starts.
func (e *env) apply(name, spec string) {
	e.t.Helper()
	f := filepath.Join(e.dir, name)
	require.NoError(e.t, os.WriteFile(f, []byte(spec), 0o644))
	require.Eventually(e.t, func() bool { _, err := e.shoal("apply", "-f", f); return err == nil }, 20*time.Second, 200*time.Millisecond)
}

// oneReplica applies the 2-node demo deployment with one replica and waits
// until it serves.
func (e *env) oneReplica() replica {
	e.t.Helper()
	e.apply("one.yaml", strings.Replace(spec2x2, "count: 2", "count: 1", 1))
	require.Eventually(e.t, func() bool { return readyCount(e.replicas()) == 1 }, 60*time.Second, 200*time.Millisecond)
	return e.replicas()[0]
}
