package console

import (
	"encoding/json"
	"testing"
	"time"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testNodes() []*coordv1.NodeInfo {
	return []*coordv1.NodeInfo{
		{NodeId: "n1", Healthy: true, GpuCount: 8, GroupId: "g1", Role: "worker", State: "assigned"},
		{NodeId: "n2", Healthy: true, GpuCount: 8, GroupId: "g1", Role: "head", State: "assigned"},
		{NodeId: "n3", Healthy: false, GpuCount: 8, State: "unhealthy"},
		{NodeId: "n4", Healthy: true, GpuCount: 8, GroupId: "g2", Role: "head", State: "assigned"},
	}
}

func testReplicas() []*coordv1.ReplicaInfo {
	return []*coordv1.ReplicaInfo{
		{GroupId: "g2", Deployment: "b", Members: []string{"n4", "n5"}, Head: "n4", State: "degraded"},
		{GroupId: "g1", Deployment: "a", Members: []string{"n1", "n2"}, Head: "n2", State: "ready", NumRequestsRunning: 3, KvCacheUsage: 0.5},
	}
}

func ids(ns []Node) []string {
	out := []string{}
	for _, n := range ns {
		out = append(out, n.ID)
	}
	return out
}

func TestBuildCluster(t *testing.T) {
	inv := map[string]*Inventory{"n3": {GPUs: []GPU{{Index: 0, Healthy: false, Reasons: []string{"Xid 79"}}, {Index: 1, Healthy: true}}}}
	for _, tc := range []struct {
		name     string
		f        Filter
		replicas []string   // ids in order
		members  [][]string // per replica, head first
		free     []string
	}{
		{name: "all", replicas: []string{"g1", "g2"}, members: [][]string{{"n2", "n1"}, {"n4", "n5"}}, free: []string{"n3"}},
		{name: "one deployment", f: Filter{Deployment: "b"}, replicas: []string{"g2"}, members: [][]string{{"n4", "n5"}}, free: []string{}},
		{name: "unhealthy: the missing member and the sick node", f: Filter{Health: "unhealthy"}, replicas: []string{"g2"}, members: [][]string{{"n5"}}, free: []string{"n3"}},
		{name: "healthy", f: Filter{Health: "healthy"}, replicas: []string{"g1", "g2"}, members: [][]string{{"n2", "n1"}, {"n4"}}, free: []string{}},
		{name: "no such deployment", f: Filter{Deployment: "zz"}, replicas: []string{}, members: [][]string{}, free: []string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := buildCluster(testNodes(), testReplicas(), inv, tc.f)
			assert.Equal(t, 4, v.Nodes)
			assert.Equal(t, 3, v.HealthyNodes)
			assert.Equal(t, 32, v.GPUs)
			assert.Equal(t, 1, v.UnhealthyGPUs)
			assert.Equal(t, []string{"a", "b"}, v.Deployments)
			got := []string{}
			members := [][]string{}
			for _, r := range v.Replicas {
				got = append(got, r.ID)
				members = append(members, ids(r.Members))
			}
			assert.Equal(t, tc.replicas, got)
			assert.Equal(t, tc.members, members)
			assert.Equal(t, tc.free, ids(v.Free))
		})
	}
	v := buildCluster(testNodes(), testReplicas(), inv, Filter{})
	assert.Equal(t, "head", v.Replicas[0].Members[0].Role)
	assert.True(t, v.Replicas[1].Members[1].Missing, "n5 is in no gossip")
	assert.Equal(t, "missing", v.Replicas[1].Members[1].State)
	assert.Equal(t, Load{Running: 3, KV: 0.5}, v.Replicas[0].Load)
	assert.Equal(t, []string{"Xid 79"}, v.Free[0].Inventory.GPUs[0].Reasons)
}

func TestCheckFilter(t *testing.T) {
	assert.NoError(t, checkFilter(Filter{Health: "healthy"}))
	assert.NoError(t, checkFilter(Filter{}))
	assert.ErrorContains(t, checkFilter(Filter{Health: "sick"}), "give healthy or unhealthy")
}

func TestParseProgress(t *testing.T) {
	for _, tc := range []struct {
		in   string
		pct  float64
		rate string
		ok   bool
	}{
		{"43% 12.1 GB/s", 43, "12.1 GB/s", true},
		{"100% 0 B/s", 100, "0 B/s", true},
		{"7%", 7, "", true},
		{"", 0, "", false},
		{"43 12GB/s", 0, "", false},
		{"143% x", 0, "", false},
		{"-1% x", 0, "", false},
		{"NaN% x", 0, "", false},
		{"abc%", 0, "", false},
	} {
		pct, rate, ok := parseProgress(tc.in)
		assert.Equal(t, tc.ok, ok, tc.in)
		assert.Equal(t, tc.pct, pct, tc.in)
		assert.Equal(t, tc.rate, rate, tc.in)
	}
}

func TestETA(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s int, p float64) progressSample {
		return progressSample{At: t0.Add(time.Duration(s) * time.Second), Pct: p}
	}
	for _, tc := range []struct {
		name string
		in   []progressSample
		want float64
		ok   bool
	}{
		{"one sample", []progressSample{at(0, 10)}, 0, false},
		{"no motion", []progressSample{at(0, 10), at(10, 10)}, 0, false},
		{"1 % a second, 50 left", []progressSample{at(0, 40), at(5, 45), at(10, 50)}, 50, true},
		{"same instant", []progressSample{at(0, 40), at(0, 50)}, 0, false},
	} {
		got, ok := eta(tc.in)
		assert.Equal(t, tc.ok, ok, tc.name)
		assert.InDelta(t, tc.want, got, 1e-9, tc.name)
	}
}

func TestBuildDeployment(t *testing.T) {
	d := &coordv1.DescribeDeploymentResponse{
		Summary:  &coordv1.DeploymentSummary{Name: "a", Model: "m", Engine: "vllm", NodesPerReplica: 2, DesiredReplicas: 2, ReadyReplicas: 1},
		Replicas: []*coordv1.ReplicaInfo{{GroupId: "g1", Deployment: "a", Members: []string{"n1", "n9"}, State: "downloading", Progress: "40% 1 GB/s"}},
		Events:   []string{"12:00:00  placed replica g1"}, Autoscaler: "kpa: desired 2",
		Adapters: []*coordv1.AdapterInfo{{Name: "sql", Rank: 8, Replicas: []*coordv1.AdapterReplica{{State: "loaded"}, {State: "pending"}}}},
	}
	nodes := []*coordv1.NodeInfo{{NodeId: "n1", GroupId: "g1", Progress: "40% 1 GB/s", Healthy: true}}
	t0 := time.Unix(0, 0)
	v := buildDeployment(d, nodes, map[string][]progressSample{"n1": {{At: t0, Pct: 20}, {At: t0.Add(20 * time.Second), Pct: 40}}})
	assert.Equal(t, "a", v.Name)
	assert.Equal(t, 2, v.Desired)
	assert.Equal(t, []Download{{Replica: "g1", Node: "n1", Percent: 40, Rate: "1 GB/s", ETASeconds: 60}}, v.Downloads)
	assert.True(t, v.Replicas[0].Members[1].Missing)
	assert.Equal(t, []string{"sql (rank 8, loaded on 1)"}, v.Adapters)
	assert.Equal(t, "kpa: desired 2", v.Autoscaler)

	v = buildDeployment(d, nodes, nil)
	assert.Equal(t, -1.0, v.Downloads[0].ETASeconds, "no estimate before the pull moved")
	b, err := json.Marshal(buildDeployment(&coordv1.DescribeDeploymentResponse{}, nil, nil))
	require.NoError(t, err)
	assert.Contains(t, string(b), `"replicas":[]`, "empty lists are lists, never null, for the page")
}

func TestParseInventory(t *testing.T) {
	in, err := parseInventory([]byte(`{"gpu":{"driver_version":"550","devices":[{"index":0,"name":"NVIDIA H200","memory_mib":144384,"healthy":false,"reasons":["Xid 79: fell off the bus"]}]},"events":[{"index":0,"reason":"Xid 79"}]}`))
	require.NoError(t, err)
	assert.Equal(t, "550", in.Driver)
	assert.Equal(t, []GPU{{Index: 0, Name: "NVIDIA H200", MemoryMiB: 144384, Reasons: []string{"Xid 79: fell off the bus"}}}, in.GPUs)
	assert.Equal(t, []string{"GPU 0: Xid 79"}, in.Events)
	_, err = parseInventory([]byte(`{}`))
	assert.ErrorContains(t, err, "no GPU section")
	_, err = parseInventory([]byte(`{"gpu":`))
	assert.ErrorContains(t, err, "inventory")
}

func FuzzParseProgress(f *testing.F) {
	for _, s := range []string{"43% 12.1 GB/s", "", "%", "1e2%", "0x10% a", "100.0000001%"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		pct, _, ok := parseProgress(s)
		if ok && (pct < 0 || pct > 100 || pct != pct) {
			t.Fatalf("%q: %v accepted", s, pct)
		}
		if !ok && pct != 0 {
			t.Fatalf("%q: refused with %v", s, pct)
		}
	})
}

func FuzzParseInventory(f *testing.F) {
	f.Add([]byte(`{"gpu":{"devices":[{"index":0,"healthy":true}]}}`))
	f.Add([]byte(`{"gpu":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := parseInventory(b)
		if err == nil && in.GPUs == nil {
			t.Fatal("an accepted inventory has a GPU list")
		}
	})
}
