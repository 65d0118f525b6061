package console

import (
	"context"
	"sync"
	"time"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
)

// Sample is a replica's load at a time.
type Sample struct {
	T int64 `json:"t"` // Unix milliseconds
	Load
	State string `json:"state"`
}

// series is a ring of samples.
type series struct {
	buf  []Sample
	next int
	full bool
	seen time.Time // the last sample's time: a replica gone long is dropped
}

func newSeries(n int) *series { return &series{buf: make([]Sample, max(n, 2))} }

func (s *series) add(x Sample, at time.Time) {
	s.buf[s.next] = x
	s.next = (s.next + 1) % len(s.buf)
	s.full = s.full || s.next == 0
	s.seen = at
}

// list is the samples, oldest first.
func (s *series) list() []Sample {
	if !s.full {
		return append([]Sample{}, s.buf[:s.next]...)
	}
	return append(append([]Sample{}, s.buf[s.next:]...), s.buf[:s.next]...)
}

// inventoryWorkers bounds the inventories read at once.
const inventoryWorkers = 8

// Run samples until ctx ends.
func (c *Console) Run(ctx context.Context) {
	t := time.NewTicker(c.cfg.Every)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c.sample(ctx, &wg)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sample records one round: each replica's load, each pulling node's
// progress, and starts reading the inventories that are due.
func (c *Console) sample(ctx context.Context, wg *sync.WaitGroup) {
	nodes, reps, err := c.snapshot(ctx)
	if err != nil {
		if ctx.Err() == nil {
			c.cfg.Log.Debug("console: sample", "err", err)
		}
		return
	}
	now := c.cfg.Now()
	due := c.record(nodes, reps, now)
	for _, d := range due {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.readInventory(ctx, d.id, d.healthy)
		}()
	}
}

// record keeps a round's samples and returns the nodes whose inventory is
// due (never read, its health changed, or older than InventoryAge), at most
// inventoryWorkers more than are being read.
func (c *Console) record(nodes []*coordv1.NodeInfo, reps []*coordv1.ReplicaInfo, now time.Time) []dueNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := int(c.cfg.Keep / c.cfg.Every)
	for _, r := range reps {
		if r.GroupId == "" {
			continue // a Slurm job still queued
		}
		s := c.series[r.GroupId]
		if s == nil {
			s = newSeries(n)
			c.series[r.GroupId] = s
		}
		s.add(Sample{T: now.UnixMilli(), Load: Load{Running: r.NumRequestsRunning, Waiting: r.NumRequestsWaiting, KV: r.KvCacheUsage}, State: r.State}, now)
	}
	for id, s := range c.series {
		if now.Sub(s.seen) > c.cfg.Keep {
			delete(c.series, id)
		}
	}
	live := map[string]bool{}
	var due []dueNode
	busy := len(c.busy)
	for _, nd := range nodes {
		live[nd.NodeId] = true
		if pct, _, ok := parseProgress(nd.Progress); ok {
			p := append(c.pulls[nd.NodeId], progressSample{At: now, Pct: pct})
			if l := len(p); l > 1 && p[l-1].Pct < p[l-2].Pct {
				p = p[l-1:] // a new pull
			}
			if len(p) > 30 {
				p = p[len(p)-30:]
			}
			c.pulls[nd.NodeId] = p
		} else {
			delete(c.pulls, nd.NodeId)
		}
		in := c.inv[nd.NodeId]
		if c.busy[nd.NodeId] || busy >= inventoryWorkers {
			continue
		}
		if in == nil || in.Healthy != nd.Healthy || now.Sub(in.At) > c.cfg.InventoryAge {
			c.busy[nd.NodeId] = true
			busy++
			due = append(due, dueNode{nd.NodeId, nd.Healthy})
		}
	}
	for id := range c.pulls {
		if !live[id] {
			delete(c.pulls, id)
		}
	}
	for id := range c.inv {
		if !live[id] && !c.busy[id] {
			delete(c.inv, id)
		}
	}
	return due
}

// dueNode is a node whose inventory is to be read, and its health then.
type dueNode struct {
	id      string
	healthy bool
}

// readInventory reads a node's inventory through DescribeNode; a failure
// is kept as the inventory's error (and read again when due, not at once).
func (c *Console) readInventory(ctx context.Context, id string, healthy bool) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	resp, err := c.cfg.API.DescribeNode(ctx, &coordv1.DescribeNodeRequest{NodeId: id})
	in := &Inventory{GPUs: []GPU{}}
	if err != nil {
		in.Err = err.Error()
	} else {
		in = inventoryOf(resp.InventoryJson)
	}
	in.Healthy, in.At = healthy, c.cfg.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.busy, id)
	if err != nil && ctx.Err() != nil {
		return // shutting down
	}
	c.inv[id] = in
}
