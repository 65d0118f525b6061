package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"
)

const rollSpec = `apiVersion: shoal/v1
name: roll
model: {source: /models/roll}
engine: {kind: ray-vllm, servedModelName: roll, startupTimeoutSeconds: 30%s}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {count: 2}
`

// TestRolloutUnderLoad: re-applying a deployment with a changed engine
// argument while clients send requests replaces every replica (a new one
// first on the spare node, an old one drained only once the new one
// serves), and not one request fails. Before, the running replicas kept
// the old arguments and nothing said so. `shoal rollout status` follows it;
// `shoal rollout undo` brings the old spec back.
func TestRolloutUnderLoad(t *testing.T) {
	e := startCluster(t, 30, 3)
	e.apply("roll.yaml", strings.Replace(rollSpec, "%s", "", 1))
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 2 }, 60*time.Second, 200*time.Millisecond)
	before := map[string]bool{}
	for _, r := range e.replicas() {
		before[r.GroupID] = true
	}

	client := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	ctx, cancel := context.WithCancel(context.Background())
	var sent, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				_, err := client.Completions.New(ctx, openai.CompletionNewParams{Model: "roll", MaxTokens: openai.Int(8),
					Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("rolling")}})
				if ctx.Err() != nil {
					return
				}
				sent.Add(1)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	time.Sleep(time.Second)
	f := filepath.Join(e.dir, "roll2.yaml")
	require.NoError(t, os.WriteFile(f, []byte(strings.Replace(rollSpec, "%s", ", args: [--max-num-seqs, \"64\"]", 1)), 0o644))
	out, err := e.shoal("apply", "-f", f)
	require.NoError(t, err, out)
	require.Contains(t, out, "rolling out new engine settings (changed: engine.args)")
	done := func() bool {
		rs := e.replicas()
		if len(rs) != 2 || readyCount(rs) != 2 {
			return false
		}
		for _, r := range rs {
			if r.Outdated || before[r.GroupID] {
				return false
			}
		}
		return true
	}
	require.Eventually(t, done, 120*time.Second, 250*time.Millisecond, "every replica replaced: %v", e.replicas())
	time.Sleep(time.Second)
	cancel()
	wg.Wait()
	require.Greater(t, sent.Load(), int64(50))
	require.Zero(t, failed.Load(), "requests failed during the rollout (of %d): %v", sent.Load(), firstErr.Load())
	out, err = e.shoal("rollout", "status", "roll")
	require.NoError(t, err, out)
	require.Contains(t, out, "every replica (2) runs the current engine settings and is ready")

	// describe shows the generations: the current engine settings, and
	// each replica's.
	out, err = e.shoal("describe", "deployment", "roll")
	require.NoError(t, err, out)
	_, rest, ok := strings.Cut(out, "Engine settings: ")
	require.True(t, ok, out)
	cur := strings.Fields(rest)[0]
	require.Equal(t, 3, strings.Count(out, cur), "the header and both replicas show %s:\n%s", cur, out)

	out, err = e.shoal("rollout", "undo", "roll")
	require.NoError(t, err, out)
	require.Contains(t, out, "rolled back")
	out, err = e.shoal("describe", "deployment", "roll")
	require.NoError(t, err, out)
	require.NotContains(t, out, "--max-num-seqs", "the spec before the change is back")
}
