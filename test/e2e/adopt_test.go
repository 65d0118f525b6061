package e2e

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"

	"github.com/shoalhq/shoal/engine/process"
	"github.com/shoalhq/shoal/internal/devcluster"
)

// alive: the process exists and is not a zombie (an engine whose agent
// exited is reaped by init, whenever init gets to it).
func alive(pid int) bool {
	st, err := process.State(pid)
	return err == nil && st != 'Z' && st != 'X'
}

// TestAgentRestartKeepsEnginesServing: while a long streaming completion runs
// through the router, the head's agent is restarted (SIGTERM, as `systemctl
// restart` does) and then the worker's agent crashes (SIGKILL of the agent
// alone) and comes back. The stream completes, the engines are the same
// processes (no new engine start), the group keeps its epoch, and new
// requests are served.
func TestAgentRestartKeepsEnginesServing(t *testing.T) {
	e := startCluster(t, 23, 2, func(c *devcluster.Config) { c.KeepEngines = true })
	before := e.oneReplica()
	idx := map[string]int{}
	for _, n := range e.nodes() {
		for i := 0; i < 2; i++ {
			if n.Address == e.c.AgentIP(i) {
				idx[n.NodeID] = i
			}
		}
	}
	var worker string
	for _, m := range before.Members {
		if m != before.Head {
			worker = m
		}
	}
	require.NotEmpty(t, worker)
	pids := map[string][]int{before.Head: e.c.EnginePids(before.Head), worker: e.c.EnginePids(worker)}
	require.Len(t, pids[before.Head], 2, "ray head and vllm serve")
	require.Len(t, pids[worker], 1, "ray worker")

	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// ~400 tokens at the 70B preset's 25 ms per token: about 10 s of stream.
	stream := client.Completions.NewStreaming(ctx, openai.CompletionNewParams{Model: "demo", MaxTokens: openai.Int(400),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("tell a long story")}},
		option.WithJSONSet("ignore_eos", true)) // vLLM's extra parameter: generate all 400 tokens
	first := make(chan struct{})
	type result struct {
		chunks int
		finish string
		err    error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		for stream.Next() {
			if r.chunks == 0 {
				close(first)
			}
			r.chunks++
			if c := stream.Current(); len(c.Choices) > 0 && c.Choices[0].FinishReason != "" {
				r.finish = string(c.Choices[0].FinishReason)
			}
		}
		r.err = stream.Err()
		done <- r
	}()
	select {
	case <-first:
	case <-time.After(20 * time.Second):
		t.Fatal("no first token")
	}
	t0 := time.Now()
	require.NoError(t, e.c.Restart(idx[before.Head]))
	t.Logf("head agent restarted (SIGTERM) in %v", time.Since(t0).Round(time.Millisecond))
	t1 := time.Now()
	require.NoError(t, e.c.CrashAgent(idx[worker]))
	t.Logf("worker agent crashed and restarted in %v", time.Since(t1).Round(time.Millisecond))

	select {
	case r := <-done:
		require.NoError(t, r.err)
		require.Equal(t, "length", r.finish, "the stream ran to its end")
		require.GreaterOrEqual(t, r.chunks, 400)
	case <-time.After(40 * time.Second):
		t.Fatal("stream did not complete")
	}
	// The same engines run: same pids, alive, recorded again by the new agents.
	for node, ps := range pids {
		require.Equal(t, ps, e.c.EnginePids(node), "%s's engines were adopted, not restarted", node)
		for _, p := range ps {
			require.True(t, alive(p), "engine pid %d on %s alive", p, node)
		}
	}
	logs, err := os.ReadFile(filepath.Join(e.dir, "logs", before.Head+".log"))
	require.NoError(t, err)
	require.Contains(t, string(logs), "adopted the running engine")
	starts := 0
	for _, l := range strings.Split(string(logs), "\n") {
		if strings.Contains(l, `msg="engine process started"`) && strings.Contains(l, " name=vllm ") {
			starts++
		}
	}
	require.Equal(t, 1, starts, "vllm was started once")

	require.Eventually(t, func() bool {
		rs := e.replicas()
		return len(rs) == 1 && rs[0].State == "ready"
	}, 20*time.Second, 200*time.Millisecond)
	after := e.replicas()[0]
	require.Equal(t, before.GroupID, after.GroupID)
	require.Equal(t, before.Epoch, after.Epoch, "not re-formed")
	require.Equal(t, before.Head, after.Head)
	require.Eventually(t, func() bool {
		r, err := http.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"hi","max_tokens":2}`))
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	}, 10*time.Second, 100*time.Millisecond, "new requests are served")
	out, err := e.shoal("describe", "deployment", "demo")
	require.NoError(t, err)
	require.NotContains(t, out, "re-formed")

	// Deleting the deployment still stops the adopted engines.
	_, err = e.shoal("delete", "deployment", "demo")
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		for _, ps := range pids {
			for _, p := range ps {
				if alive(p) {
					return false
				}
			}
		}
		return true
	}, 30*time.Second, 200*time.Millisecond, "adopted engines stop with their deployment")
}
