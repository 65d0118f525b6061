package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/shoalhq/shoal/internal/devcluster"
	"github.com/shoalhq/shoal/internal/s3test"
	"github.com/stretchr/testify/require"
)

const loraSpec = `apiVersion: shoal/v1
name: llama
model: {source: /models/llama-8b}
engine: {kind: ray-vllm, servedModelName: llama, lora: {maxLoras: 4, maxLoraRank: 16, maxCpuLoras: 16}, startupTimeoutSeconds: 60}
resources: {nodes: 1, gpusPerNode: 8}
replicas: {count: 2}
`

type adapterRow struct {
	Name     string `json:"name"`
	Replicas []struct {
		GroupID string `json:"groupId"`
		State   string `json:"state"`
		Pinned  bool   `json:"pinned"`
		Reason  string `json:"reason"`
	} `json:"replicas"`
}

func (e *env) adapters(dep string) []adapterRow {
	out, err := e.shoal("adapter", "list", dep, "-o", "json")
	if err != nil {
		return nil
	}
	var r struct {
		Adapters []adapterRow `json:"adapters"`
	}
	if json.Unmarshal([]byte(out), &r) != nil {
		return nil
	}
	return r.Adapters
}

// loadedOn is where each adapter is loaded, and where it is pinned.
func loadedOn(rows []adapterRow) (loaded, pinned map[string][]string) {
	loaded, pinned = map[string][]string{}, map[string][]string{}
	for _, a := range rows {
		for _, r := range a.Replicas {
			if r.State == "loaded" {
				loaded[a.Name] = append(loaded[a.Name], r.GroupID)
			}
			if r.Pinned {
				pinned[a.Name] = append(pinned[a.Name], r.GroupID)
			}
		}
	}
	return loaded, pinned
}

// writeAdapter writes a PEFT adapter directory of rank r.
func writeAdapter(t *testing.T, dir string, r int) {
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "adapter_config.json"), []byte(fmt.Sprintf(`{"peft_type":"LORA","r":%d,"lora_alpha":16}`, r)), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "adapter_model.safetensors"), []byte("weights"), 0o644))
}

// TestAdaptersAtRunTime: 20 LoRA adapters added to a running 2-replica
// deployment through the CLI, each called by name through openai-go; a
// replica's host killed, and its adapters loaded again on the re-formed
// group; an adapter removed, then 404 and its slot freed; bad input refused
// with nothing half-loaded.
func TestAdaptersAtRunTime(t *testing.T) {
	srv := s3test.Start(t)
	_, err := srv.Put(context.Background(), "loras", "s3ad", s3test.Tree{"adapter_model.safetensors": 1 << 20}, 0)
	require.NoError(t, err)
	_, err = srv.Client.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String("loras"), Key: aws.String("s3ad/adapter_config.json"),
		Body: strings.NewReader(`{"peft_type":"LORA","r":8}`)})
	require.NoError(t, err)
	e := startCluster(t, 37, 3, func(c *devcluster.Config) {
		c.SimEnv = append(append(c.SimEnv, "SHOAL_SIM_LORA_LOAD=50ms"), srv.Env()...)
	})
	e.apply("llama.yaml", loraSpec)
	require.Eventually(t, func() bool { return readyCount(e.replicas()) == 2 }, 90*time.Second, 200*time.Millisecond)

	const n = 20
	for i := 0; i < n; i++ {
		dir := filepath.Join(e.dir, "adapters", fmt.Sprintf("ad%02d", i))
		writeAdapter(t, dir, 8)
		out, err := e.shoal("adapter", "add", "llama", fmt.Sprintf("ad%02d", i), "--source", dir, "--rank", "8")
		require.NoError(t, err, out)
	}
	// Every adapter pinned on one replica, spread over both, and loaded.
	require.Eventually(t, func() bool {
		loaded, pinned := loadedOn(e.adapters("llama"))
		if len(loaded) != n || len(pinned) != n {
			return false
		}
		per := map[string]int{}
		for _, gs := range pinned {
			per[gs[0]]++
		}
		return len(per) == 2 && per[e.replicas()[0].GroupID] == n/2
	}, 60*time.Second, 200*time.Millisecond, "20 adapters pinned 10 and 10, and loaded")

	cl := openai.NewClient(option.WithBaseURL("http://"+e.router+"/v1"), option.WithAPIKey("none"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	call := func(model string) (*openai.ChatCompletion, error) {
		return cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: model, MaxTokens: openai.Int(4),
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hello")}})
	}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("ad%02d", i)
		resp, err := call(name)
		var ae *openai.Error
		if errors.As(err, &ae) {
			t.Fatalf("%s: %d %s", name, ae.StatusCode, ae.RawJSON())
		}
		require.NoError(t, err, name)
		require.Equal(t, name, resp.Model, "the engine ran the adapter")
	}
	// One from S3, pulled by the model downloader on the replica that loads
	// it; one whose source holds nothing: failed, with the reason, in
	// `shoal adapter list` and in the 503 its request gets.
	out, err := e.shoal("adapter", "add", "llama", "s3ad", "--source", "s3://loras/s3ad", "--rank", "8")
	require.NoError(t, err, out)
	out, err = e.shoal("adapter", "add", "llama", "missing", "--source", "s3://loras/nothing-here", "--rank", "8")
	require.NoError(t, err, out)
	require.Eventually(t, func() bool {
		resp, err := call("s3ad")
		return err == nil && resp.Model == "s3ad"
	}, 60*time.Second, 200*time.Millisecond, "an adapter pulled from S3 serves")
	// One copy per host that loaded it (the router may have a second
	// replica load it before the coordinator's pin lands), none elsewhere.
	for i := 0; i < 3; i++ {
		copies, _ := filepath.Glob(filepath.Join(e.dir, devcluster.NodeID(i), "models", "adapters", "s3ad-*"))
		require.LessOrEqual(t, len(copies), 1, "one copy per host")
	}
	pulled, _ := filepath.Glob(filepath.Join(e.dir, "node-*", "models", "adapters", "s3ad-*", "adapter_config.json"))
	require.NotEmpty(t, pulled, "pulled from S3 by the model downloader")
	require.Eventually(t, func() bool {
		for _, a := range e.adapters("llama") {
			for _, r := range a.Replicas {
				if a.Name == "missing" && r.State == "failed" && r.Reason != "" {
					return true
				}
			}
		}
		return false
	}, 60*time.Second, 200*time.Millisecond, "the missing source shows as failed with its reason")
	_, err = call("missing")
	var ae *openai.Error
	require.ErrorAs(t, err, &ae)
	require.Equal(t, 503, ae.StatusCode)
	require.Contains(t, ae.Message, "adapter `missing`")
	out, err = e.shoal("adapter", "remove", "llama", "s3ad", "missing")
	require.NoError(t, err, out)

	models, err := cl.Models.List(ctx)
	require.NoError(t, err)
	parents := map[string]string{}
	for _, m := range models.Data {
		var raw struct {
			Parent string `json:"parent"`
		}
		require.NoError(t, json.Unmarshal([]byte(m.RawJSON()), &raw))
		parents[m.ID] = raw.Parent
	}
	for i := 0; i < n; i++ {
		require.Equal(t, "llama", parents[fmt.Sprintf("ad%02d", i)], "/v1/models lists the adapter with its base as parent")
	}

	// Kill the host of one replica: the group re-forms on the spare, and
	// the adapters pinned on it are loaded there again.
	_, pinned := loadedOn(e.adapters("llama"))
	victim := e.replicas()[0]
	var mine []string
	for a, gs := range pinned {
		if gs[0] == victim.GroupID {
			mine = append(mine, a)
		}
	}
	require.Len(t, mine, n/2)
	require.NoError(t, e.c.Kill(victim.Head))
	require.Eventually(t, func() bool {
		for _, r := range e.replicas() {
			if r.GroupID == victim.GroupID && r.State == "ready" && r.Head != victim.Head {
				return true
			}
		}
		return false
	}, 90*time.Second, 200*time.Millisecond, "the group re-formed on the spare")
	require.Eventually(t, func() bool {
		loaded, _ := loadedOn(e.adapters("llama"))
		for _, a := range mine {
			found := false
			for _, g := range loaded[a] {
				found = found || g == victim.GroupID
			}
			if !found {
				return false
			}
		}
		return true
	}, 60*time.Second, 200*time.Millisecond, "the re-formed group loaded its adapters again")
	for _, a := range mine {
		resp, err := call(a)
		require.NoError(t, err, a)
		require.Equal(t, a, resp.Model)
	}

	// Remove one: 404 afterwards, its slot freed on the engine that held it.
	gone := mine[0]
	out, err = e.shoal("adapter", "remove", "llama", gone)
	require.NoError(t, err, out)
	var reFormed replica
	for _, r := range e.replicas() {
		if r.GroupID == victim.GroupID {
			reFormed = r
		}
	}
	engineHolds := func(addr, name string) bool {
		resp, err := http.Get("http://" + addr + "/v1/models")
		if err != nil {
			return true
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(b), `"id":"`+name+`"`)
	}
	require.Eventually(t, func() bool { return !engineHolds(reFormed.Endpoint, gone) }, 30*time.Second, 100*time.Millisecond,
		"the engine unloaded the removed adapter")
	require.Eventually(t, func() bool {
		_, err := call(gone)
		var ae *openai.Error
		return errors.As(err, &ae) && ae.StatusCode == 404 && strings.Contains(ae.Message, gone)
	}, 30*time.Second, 100*time.Millisecond, "a removed adapter is a 404 naming it")
	require.Len(t, e.adapters("llama"), n-1)

	// Bad input: a clear error, nothing stored or loaded.
	bad := filepath.Join(e.dir, "adapters", "big")
	writeAdapter(t, bad, 64)
	e.apply("other.yaml", strings.ReplaceAll(strings.Replace(loraSpec, "count: 2", "count: 0", 1), "llama", "other"))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ad01", "--source", "ftp://host/x", "--rank", "8"}, "already has an adapter"},
		{[]string{"new", "--source", "ftp://host/x", "--rank", "8"}, "adapters[19].source"},
		{[]string{"big", "--source", bad, "--rank", "64"}, "64 is above the engine's largest rank, engine.lora.maxLoraRank 16"},
		{[]string{"other", "--source", bad, "--rank", "8"}, `"other" is the name of deployment other`},
		{[]string{"llama", "--source", bad, "--rank", "8"}, "the deployment's own served model name"},
	} {
		out, err := e.shoal(append([]string{"adapter", "add", "llama"}, tc.args...)...)
		require.Error(t, err, out)
		require.Contains(t, out, tc.want)
	}
	out, err = e.shoal("adapter", "add", "nodeployment", "x", "--source", bad, "--rank", "8")
	require.Error(t, err)
	require.Contains(t, out, `deployment "nodeployment" not found`)
	require.Len(t, e.adapters("llama"), n-1, "nothing half-added")
	out, err = e.shoal("describe", "deployment", "llama")
	require.NoError(t, err, out)
	require.Contains(t, out, "Adapters:")
	require.Contains(t, out, "ad01")
}
