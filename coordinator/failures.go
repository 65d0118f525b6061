package coordinator

import (
	"context"
	"sync"
	"time"

	"github.com/shoalhq/shoal/gossip"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
)

// failureNotes asks members whose engine failed for the reason and records it
// as a deployment event, so `shoal describe deployment` says why a replica
// does not come up (a missing shard, a pull that ran out of time, …).
type failureNotes struct {
	mu   sync.Mutex
	last map[string]time.Time // node → last query; guarded by mu
}

func (c *Coordinator) noteFailures(ctx context.Context, g *Group, nodes map[string]gossip.Tag) {
	for _, m := range g.Members {
		t, ok := nodes[m.NodeID]
		if !ok || t.Group != g.ID || t.Epoch != g.Epoch || t.Engine != gossip.EngineFailed {
			continue
		}
		c.failures.mu.Lock()
		if c.failures.last == nil {
			c.failures.last = map[string]time.Time{}
		}
		recent := time.Since(c.failures.last[t.ID]) < 3*time.Second
		if !recent {
			c.failures.last[t.ID] = time.Now()
		}
		c.failures.mu.Unlock()
		if recent {
			continue
		}
		go func(t gossip.Tag) {
			_ = c.agentCall(context.WithoutCancel(ctx), t.GRPC, func(ctx context.Context, cl agentv1.AgentClient) error {
				ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				defer cancel()
				st, err := cl.Status(ctx, &agentv1.StatusRequest{})
				if err == nil && st.GetMessage() != "" {
					c.events.add(g.Deployment, "fail/"+t.ID, "replica %s: %s engine failed: %s", g.ID, t.ID, st.GetMessage())
				}
				return err
			})
		}(t)
	}
}
