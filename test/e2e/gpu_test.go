package e2e

import (
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func appendFault(t *testing.T, path, line string) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	require.NoError(t, err)
	_, err = f.WriteString(line + "\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

// TestGPUXidMovesTraffic: 3 agents on mock H200s, one 2-node replica. An
// application Xid (13) on the head changes nothing; a hardware Xid (79) on
// the worker during traffic makes the router stop using the replica within
// 2 s, and the group re-forms on the spare node.
func TestGPUXidMovesTraffic(t *testing.T) {
	e := startCluster(t, 11, 3)
	r0 := e.oneReplica()
	idx := map[string]int{}
	for i := 0; i < 3; i++ {
		idx["node-"+string(rune('1'+i))] = i
	}
	var worker, head string
	for _, n := range e.nodes() {
		switch n.Role {
		case "worker":
			worker = n.NodeID
		case "head":
			head = n.NodeID
		}
	}
	require.NotEmpty(t, worker)

	// Xid 13 is an application error: no effect on the node or the replica.
	appendFault(t, e.c.FaultsFile(idx[head]), "xid 0 13")
	time.Sleep(1500 * time.Millisecond)
	rs := e.replicas()
	require.Equal(t, "ready", rs[0].State)
	require.Equal(t, r0.Epoch, rs[0].Epoch)

	// Xid 79 (fell off the bus) on the worker, during traffic.
	hc := &http.Client{Timeout: 10 * time.Second}
	appendFault(t, e.c.FaultsFile(idx[worker]), "xid 3 79")
	injected := time.Now()
	lastOld := time.Time{}
	for time.Since(injected) < 4*time.Second {
		resp, err := hc.Post("http://"+e.router+"/v1/completions", "application/json", strings.NewReader(`{"model":"demo","prompt":"x","max_tokens":1}`))
		if err == nil {
			if resp.StatusCode == 200 && resp.Header.Get("X-Shoal-Epoch") == r0.Epoch {
				lastOld = time.Now()
			}
			resp.Body.Close()
		}
		time.Sleep(20 * time.Millisecond)
	}
	require.Less(t, lastOld.Sub(injected), 2*time.Second, "the router kept using the replica with a faulty GPU")
	t.Logf("router last used the replica %.2fs after the Xid", max(0, lastOld.Sub(injected).Seconds()))

	require.Eventually(t, func() bool {
		for _, r := range e.replicas() {
			if r.State == "ready" && r.Epoch != r0.Epoch {
				return !strings.Contains(strings.Join(r.Members, ","), worker)
			}
		}
		return false
	}, 60*time.Second, 200*time.Millisecond, "re-formed without the faulty node")
	out, err := e.shoal("describe", "node", worker)
	require.NoError(t, err, out)
	require.Contains(t, out, "XID 79")
	require.Contains(t, out, "NOT ready")
	for _, n := range e.nodes() {
		if n.NodeID == worker {
			require.Equal(t, "unhealthy", n.State)
		}
	}
	out, err = e.shoal("describe", "node", "node-99")
	require.Error(t, err)
	require.Contains(t, out, "not found")
}
