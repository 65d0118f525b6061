package router

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/stretchr/testify/require"
)

// A head that lists its DP ranks is one endpoint per rank, each with the
// rank's own load; pinned ranks share their server's address.
func TestEndpointsPerRank(t *testing.T) {
	v := ReplicaView{Key: HeadKey{Node: "n1", Group: "g1", Epoch: 2, Term: 1}, Info: HeadInfo{Deployment: "d"},
		Metrics: &replicav1.Metrics{ServedModelName: "m", Endpoint: "10.0.0.1:8000", Serving: true, NumRequestsRunning: 9, MetricsValid: true,
			Ranks: []*replicav1.Rank{
				{Rank: 0, Endpoint: "10.0.0.1:8000", Pin: true, NumRequestsRunning: 4},
				{Rank: 1, Endpoint: "10.0.0.1:8000", Pin: true, NumRequestsRunning: 5},
				{Rank: 2, Endpoint: "10.0.0.2:8000", Pin: true},
			}}}
	eps := endpointsOf(v)
	require.Len(t, eps, 3)
	require.Equal(t, "10.0.0.1:8000#1", eps[1].ID())
	require.Equal(t, 5.0, eps[1].Running, "the rank's own load, not the group's")
	require.Equal(t, "g1", eps[2].Group, "fate sharing: every rank is of its group")
	require.Equal(t, "10.0.0.2:8000", eps[2].Addr)

	v.Metrics.Ranks = nil
	eps = endpointsOf(v)
	require.Len(t, eps, 1)
	require.Equal(t, "10.0.0.1:8000", eps[0].ID())
	require.Equal(t, -1, eps[0].Rank)
}

// The router spreads requests over the ranks of a hybrid server and pins
// each with X-data-parallel-rank.
func TestRouterPinsRanks(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]int{}
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.Header.Get("X-data-parallel-rank")]++
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"choices":[]}`))
	}))
	t.Cleanup(s.Close)
	var eps []*Endpoint
	for rank := 0; rank < 4; rank++ {
		eps = append(eps, &Endpoint{Model: "m", Addr: addr(s), Group: "g1", Rank: rank, PinRank: true})
	}
	plain := &Endpoint{Model: "m", Addr: addr(s), Group: "g2", Rank: -1}
	r, _ := newRouter(append(eps, plain)...)
	h := r.Handler()
	for i := 0; i < 50; i++ {
		rec := do(t, h, `{"model":"m"}`, map[string]string{"routing-strategy": "random"})
		require.Equal(t, 200, rec.Code)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, rank := range []string{"0", "1", "2", "3"} {
		require.Positive(t, seen[rank], "rank %s never picked: %v", rank, seen)
	}
	require.Positive(t, seen[""], "a replica without ranks gets no header")
}
