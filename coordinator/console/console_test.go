package console

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// fakeAPI answers the calls the console makes; others panic.
type fakeAPI struct {
	coordv1.CoordinatorClient
	mu        sync.Mutex
	nodes     []*coordv1.NodeInfo
	replicas  []*coordv1.ReplicaInfo
	described []string // DescribeNode calls
	inventory string
	logs      []*coordv1.LogChunk
	logsErr   error
	stale     string // the stale mark ListNodes answers with
}

func (f *fakeAPI) ListNodes(_ context.Context, _ *coordv1.ListNodesRequest, opts ...grpc.CallOption) (*coordv1.ListNodesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, o := range opts {
		if h, ok := o.(grpc.HeaderCallOption); ok && f.stale != "" {
			*h.HeaderAddr = metadata.Pairs("shoal-stale", f.stale)
		}
	}
	return &coordv1.ListNodesResponse{Nodes: f.nodes}, nil
}

func (f *fakeAPI) ListReplicas(context.Context, *coordv1.ListReplicasRequest, ...grpc.CallOption) (*coordv1.ListReplicasResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return &coordv1.ListReplicasResponse{Replicas: f.replicas}, nil
}

func (f *fakeAPI) DescribeNode(_ context.Context, req *coordv1.DescribeNodeRequest, _ ...grpc.CallOption) (*coordv1.DescribeNodeResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.described = append(f.described, req.NodeId)
	for _, n := range f.nodes {
		if n.NodeId == req.NodeId {
			return &coordv1.DescribeNodeResponse{Node: n, InventoryJson: []byte(f.inventory)}, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "node %q: not found", req.NodeId)
}

func (f *fakeAPI) ListDeployments(context.Context, *coordv1.ListDeploymentsRequest, ...grpc.CallOption) (*coordv1.ListDeploymentsResponse, error) {
	return &coordv1.ListDeploymentsResponse{Deployments: []*coordv1.DeploymentSummary{{Name: "a"}, {Name: "gone"}}}, nil
}

func (f *fakeAPI) DescribeDeployment(_ context.Context, req *coordv1.DescribeDeploymentRequest, _ ...grpc.CallOption) (*coordv1.DescribeDeploymentResponse, error) {
	if req.Name != "a" {
		return nil, status.Errorf(codes.NotFound, "deployment %q: not found", req.Name)
	}
	return &coordv1.DescribeDeploymentResponse{Summary: &coordv1.DeploymentSummary{Name: "a"}, Replicas: f.replicas[1:], Events: []string{"placed"}}, nil
}

type fakeLogs struct {
	grpc.ClientStream
	chunks []*coordv1.LogChunk
	err    error
}

func (s *fakeLogs) Recv() (*coordv1.LogChunk, error) {
	if len(s.chunks) == 0 {
		if s.err != nil {
			return nil, s.err
		}
		return nil, io.EOF
	}
	c := s.chunks[0]
	s.chunks = s.chunks[1:]
	return c, nil
}

func (f *fakeAPI) Logs(_ context.Context, req *coordv1.LogsRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[coordv1.LogChunk], error) {
	if req.Replica != "g1" {
		return &fakeLogs{err: status.Errorf(codes.NotFound, "replica %q: not found", req.Replica)}, nil
	}
	return &fakeLogs{chunks: append([]*coordv1.LogChunk(nil), f.logs...), err: f.logsErr}, nil
}

const goodInventory = `{"gpu":{"devices":[{"index":0,"healthy":true},{"index":1,"healthy":false,"reasons":["Xid 48: double-bit ECC error"]}]}}`

func newTest(t *testing.T, chat http.Handler) (*Console, *fakeAPI, *httptest.Server) {
	f := &fakeAPI{nodes: testNodes(), replicas: testReplicas(), inventory: goodInventory,
		logs: []*coordv1.LogChunk{{NodeId: "n2", Name: "vllm", Data: []byte("INFO started\n")}, {NodeId: "n2", Name: "vllm", Data: []byte("bad \xff byte\n")}}}
	c := New(Config{API: f, Chat: chat, StaleHeader: "shoal-stale", Auth: func(r *http.Request, tok string) (string, error) {
		if h := r.Header.Get("Authorization"); h != "" {
			tok = strings.TrimPrefix(h, "Bearer ")
		}
		if tok == "good" {
			return "alice", nil
		}
		return "", errors.New("token not accepted")
	}})
	s := httptest.NewServer(c.Handler())
	t.Cleanup(s.Close)
	return c, f, s
}

// call sends one request with headers (name, value, …) and reads the answer.
func call(t *testing.T, method, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func get(t *testing.T, url string, hdr ...string) (*http.Response, string) {
	t.Helper()
	return call(t, http.MethodGet, url, "", hdr...)
}

func post(t *testing.T, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	return call(t, http.MethodPost, url, body, hdr...)
}

const auth = "Authorization"

func TestEveryViewNeedsALogin(t *testing.T) {
	_, _, s := newTest(t, http.NotFoundHandler())
	for _, p := range []string{"/api/whoami", "/api/cluster", "/api/nodes/n1", "/api/deployments", "/api/deployments/a", "/api/replicas/g1", "/api/replicas/g1/logs", "/api/models"} {
		resp, body := get(t, s.URL+p)
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, p)
		assert.Contains(t, body, "token not accepted", p)
		resp, _ = get(t, s.URL+p, auth, "Bearer wrong")
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, p)
	}
	resp, err := http.Post(s.URL+"/api/chat", "application/json", strings.NewReader("{}"))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	// The page itself (a login form, no data) and its assets load.
	resp, body := get(t, s.URL+"/")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, "/static/app.js")
	assert.Contains(t, resp.Header.Get("Content-Security-Policy"), "default-src 'self'")
	assert.Equal(t, "DENY", resp.Header.Get("X-Frame-Options"))
	resp, body = get(t, s.URL+"/static/app.js")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, "function viewCluster")
	resp, body = get(t, s.URL+"/nope")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	assert.Contains(t, body, "no such page")
}

func TestLogin(t *testing.T) {
	_, _, s := newTest(t, nil)
	resp, body := post(t, s.URL+"/login", `{"token":"good"}`)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode, "a cross-site form cannot log in")
	assert.Contains(t, body, "X-Shoal-Console")
	resp, _ = post(t, s.URL+"/login", `{"token":"good"}`, "X-Shoal-Console", "1", "Origin", "https://evil.example")
	assert.Equal(t, http.StatusForbidden, resp.StatusCode, "another origin")
	resp, body = post(t, s.URL+"/login", `{"token":"bad"}`, "X-Shoal-Console", "1")
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	assert.Contains(t, body, "token not accepted")
	resp, body = post(t, s.URL+"/login", `not json`, "X-Shoal-Console", "1")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Contains(t, body, "want {")
	resp, _ = post(t, s.URL+"/login", `{"token":"good"}`, "X-Shoal-Console", "1", "Origin", s.URL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	ck := resp.Cookies()
	require.Len(t, ck, 1)
	assert.Equal(t, cookieName, ck[0].Name)
	assert.True(t, ck[0].HttpOnly)
	assert.Equal(t, http.SameSiteStrictMode, ck[0].SameSite)
	resp, body = get(t, s.URL+"/api/whoami", "Cookie", ck[0].Name+"="+ck[0].Value)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.JSONEq(t, `{"name":"alice","playground":false}`, body)
}

func TestClusterJSON(t *testing.T) {
	_, _, s := newTest(t, nil)
	resp, body := get(t, s.URL+"/api/cluster", auth, "Bearer good")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Contains(t, body, `"nodes":4`)
	tag := resp.Header.Get("ETag")
	require.NotEmpty(t, tag)
	resp, body = get(t, s.URL+"/api/cluster", auth, "Bearer good", "If-None-Match", tag)
	assert.Equal(t, http.StatusNotModified, resp.StatusCode, "an unchanged view")
	assert.Empty(t, body)
	resp, body = get(t, s.URL+"/api/cluster?health=sick", auth, "Bearer good")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Contains(t, body, "give healthy or unhealthy")
	resp, body = get(t, s.URL+"/api/cluster?deployment=b&health=unhealthy", auth, "Bearer good")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, `"id":"n5"`)
	assert.NotContains(t, body, `"id":"n4"`)
}

func TestAStaleReadIsSaid(t *testing.T) {
	_, f, s := newTest(t, nil)
	resp, _ := get(t, s.URL+"/api/cluster", auth, "Bearer good")
	assert.Empty(t, resp.Header.Get("X-Shoal-Stale"))
	f.stale = "no coordinator leader: quorum is lost"
	for _, p := range []string{"/api/cluster", "/api/deployments", "/api/replicas/g1"} {
		resp, body := get(t, s.URL+p, auth, "Bearer good")
		assert.Equal(t, http.StatusOK, resp.StatusCode, body)
		assert.Equal(t, f.stale, resp.Header.Get("X-Shoal-Stale"), p)
	}
}

func TestNodeDeploymentsReplica(t *testing.T) {
	_, _, s := newTest(t, nil)
	resp, body := get(t, s.URL+"/api/nodes/n1", auth, "Bearer good")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Contains(t, body, "Xid 48: double-bit ECC error")
	resp, body = get(t, s.URL+"/api/nodes/zz", auth, "Bearer good")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	assert.Contains(t, body, `node \"zz\": not found`)

	resp, body = get(t, s.URL+"/api/deployments", auth, "Bearer good")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Contains(t, body, `"name":"a"`)
	assert.NotContains(t, body, `"gone"`, "a deployment deleted between the list and its description is left out")
	resp, _ = get(t, s.URL+"/api/deployments/gone", auth, "Bearer good")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)

	resp, body = get(t, s.URL+"/api/replicas/g1", auth, "Bearer good")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Contains(t, body, `"series":[]`)
	assert.Contains(t, body, `"everySeconds":2`)
	resp, body = get(t, s.URL+"/api/replicas/nope", auth, "Bearer good")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	assert.Contains(t, body, `replica \"nope\": not found`)
}

func TestLogsStream(t *testing.T) {
	_, f, s := newTest(t, nil)
	resp, body := get(t, s.URL+"/api/replicas/g1/logs?tail=100", auth, "Bearer good")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	assert.Equal(t, "event: log\ndata: {\"name\":\"vllm\",\"node\":\"n2\",\"text\":\"INFO started\\n\"}\n\n"+
		"event: log\ndata: {\"name\":\"vllm\",\"node\":\"n2\",\"text\":\"bad \uFFFD byte\\n\"}\n\n"+
		"event: end\ndata: {}\n\n", body)

	resp, body = get(t, s.URL+"/api/replicas/nope/logs", auth, "Bearer good")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode, "an unknown replica is a 404, not an empty stream")
	assert.Contains(t, body, "not found")
	resp, body = get(t, s.URL+"/api/replicas/g1/logs?tail=-5", auth, "Bearer good")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Contains(t, body, "give bytes")

	f.logsErr = status.Error(codes.Unavailable, "node n2: its agent did not answer")
	_, body = get(t, s.URL+"/api/replicas/g1/logs", auth, "Bearer good")
	assert.True(t, strings.HasSuffix(body, "event: fail\ndata: {\"error\":\"node n2: its agent did not answer\"}\n\n"), body)
}

func TestPlaygroundGoesThroughTheRouter(t *testing.T) {
	var got *http.Request
	chat := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "data: "+string(b)+"\n\ndata: [DONE]\n\n")
	})
	_, _, s := newTest(t, chat)
	resp, body := post(t, s.URL+"/api/chat", `{"model":"m"}`, auth, "Bearer good")
	assert.Equal(t, http.StatusForbidden, resp.StatusCode, "the console's header is needed")
	resp, body = post(t, s.URL+"/api/chat", `{"model":"m"}`, auth, "Bearer good", "X-Shoal-Console", "1", "X-Router-Key", "sk-1", "Cookie", cookieName+"=good")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Equal(t, "data: {\"model\":\"m\"}\n\ndata: [DONE]\n\n", body)
	assert.Equal(t, "/v1/chat/completions", got.URL.Path)
	assert.Equal(t, "Bearer sk-1", got.Header.Get("Authorization"), "the router's key, not the console's token")
	assert.Empty(t, got.Header.Get("Cookie"), "the console's login stays in the console")

	resp, body = post(t, s.URL+"/api/chat", strings.Repeat("x", maxChatBody+10), auth, "Bearer good", "X-Shoal-Console", "1")
	assert.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode)
	assert.Contains(t, body, "at most")

	_, _, none := newTest(t, nil)
	resp, body = get(t, none.URL+"/api/models", auth, "Bearer good")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	assert.Contains(t, body, "runs no router")
}

func TestSampling(t *testing.T) {
	c, f, _ := newTest(t, nil)
	now := time.Unix(1000, 0)
	c.cfg.Now = func() time.Time { return now }
	f.nodes[0].Progress = "10% 1 GB/s"
	var wg sync.WaitGroup
	c.sample(context.Background(), &wg)
	wg.Wait()
	assert.ElementsMatch(t, []string{"n1", "n2", "n3", "n4"}, f.described, "every node's inventory is read once")
	require.NotNil(t, c.inventories()["n1"])
	assert.False(t, c.inventories()["n1"].GPUs[1].Healthy)
	assert.Len(t, c.series["g1"].list(), 1)
	assert.Equal(t, 3.0, c.series["g1"].list()[0].Running)

	// Nothing is due until a node's health changes or its inventory ages.
	f.described = nil
	now = now.Add(10 * time.Second)
	f.nodes[0].Progress = "30% 1 GB/s"
	c.sample(context.Background(), &wg)
	wg.Wait()
	assert.Empty(t, f.described)
	e, ok := eta(c.pulls["n1"])
	assert.True(t, ok)
	assert.InDelta(t, 35, e, 1e-9, "20 %% in 10 s, 70 %% to go")

	f.nodes[2].Healthy = true
	c.sample(context.Background(), &wg)
	wg.Wait()
	assert.Equal(t, []string{"n3"}, f.described, "a node whose health changed is read again")

	f.described = nil
	now = now.Add(c.cfg.InventoryAge + time.Second)
	f.nodes = f.nodes[:2] // n3 and n4 leave
	f.replicas = f.replicas[1:]
	c.sample(context.Background(), &wg)
	wg.Wait()
	assert.ElementsMatch(t, []string{"n1", "n2"}, f.described, "old inventories are read again")
	assert.Nil(t, c.inventories()["n3"], "a node that left is forgotten")

	now = now.Add(c.cfg.Keep + time.Second)
	f.replicas = nil
	c.sample(context.Background(), &wg)
	wg.Wait()
	assert.Empty(t, c.series, "a replica gone longer than Keep is forgotten")
}

func TestSeriesRing(t *testing.T) {
	s := newSeries(3)
	for i := 1; i <= 5; i++ {
		s.add(Sample{T: int64(i)}, time.Time{})
	}
	var ts []int64
	for _, x := range s.list() {
		ts = append(ts, x.T)
	}
	assert.Equal(t, []int64{3, 4, 5}, ts)
}

func TestRunStopsWithItsContext(t *testing.T) {
	c, f, _ := newTest(t, nil)
	c.cfg.Every = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	require.Eventually(t, func() bool { f.mu.Lock(); defer f.mu.Unlock(); return len(f.described) == 4 }, 10*time.Second, time.Millisecond)
	cancel()
	<-done
}
