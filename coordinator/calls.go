package coordinator

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	"github.com/shoalhq/shoal/security"
)

// Bounds of the calls to agents.
const (
	// rpcTimeout bounds one attempt: Assign, Release and Drain only persist
	// the change on the agent, which answers without waiting for engines.
	rpcTimeout = 10 * time.Second
	// callAttempts are made per call, callBackoff apart (doubling, jittered).
	callAttempts = 3
	callBackoff  = 200 * time.Millisecond
	// nodeCooldown keeps a node whose call failed out of calls for a while
	// (jittered), so a failing node is not hammered; the next reconcile
	// pass after it retries.
	nodeCooldown = time.Second
	// maxCalls bounds the calls in flight.
	maxCalls = 64
)

// caller owns the coordinator's calls to agents: at most one per node at a
// time, at most maxCalls at once, each attempt bounded, retried with
// jittered backoff while the error is transient, and all stopped (and
// waited for) when the coordinator exits.
type caller struct {
	ctx  context.Context // the coordinator's lifetime
	tls  *security.TLS
	log  *slog.Logger
	done func() // after every call (the reconciler runs again)
	g    errgroup.Group

	mu       sync.Mutex
	inflight map[string]bool      // guarded by mu; node → a call is under way
	cool     map[string]time.Time // guarded by mu; node → no call before
	acked    map[string]ack       // guarded by mu; node → the last assignment it acknowledged
}

// ack is an assignment a node acknowledged, and when.
type ack struct {
	group string
	epoch uint64
	at    time.Time
}

// ackGrace is how long an acknowledged assignment is not sent again while
// the node's gossip tag does not show it yet (gossip takes a moment to
// carry the new tag; without it every pass in between would send it again).
const ackGrace = 10 * time.Second

// acknowledged records that node holds group at epoch.
func (c *caller) acknowledged(node, group string, epoch uint64) {
	c.mu.Lock()
	c.acked[node] = ack{group, epoch, time.Now()}
	c.mu.Unlock()
}

// holds reports whether node acknowledged group at epoch within ackGrace.
func (c *caller) holds(node, group string, epoch uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.acked[node]
	if ok && time.Since(a.at) > ackGrace {
		delete(c.acked, node)
		return false
	}
	return ok && a.group == group && a.epoch == epoch
}

func newCaller(ctx context.Context, tl *security.TLS, log *slog.Logger, done func()) *caller {
	c := &caller{ctx: ctx, tls: tl, log: log, done: done, inflight: map[string]bool{}, cool: map[string]time.Time{}, acked: map[string]ack{}}
	c.g.SetLimit(maxCalls)
	return c
}

// busy reports the nodes with a call under way or cooling down.
func (c *caller) busy(now time.Time) map[string]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]bool, len(c.inflight)+len(c.cool))
	for n := range c.inflight {
		out[n] = true
	}
	for n, t := range c.cool {
		if now.Before(t) {
			out[n] = true
		} else {
			delete(c.cool, n)
		}
	}
	return out
}

// call runs f against node's Agent API in the background, unless a call to
// node is under way or cooling down, or maxCalls are in flight (then the
// next pass asks again). onErr hears of a call that failed every attempt.
func (c *caller) call(node, addr, what string, f func(context.Context, agentv1.AgentClient) error, onErr func(error)) bool {
	c.mu.Lock()
	if c.inflight[node] || time.Now().Before(c.cool[node]) || c.ctx.Err() != nil {
		c.mu.Unlock()
		return false
	}
	c.inflight[node] = true
	c.mu.Unlock()
	started := c.g.TryGo(func() error {
		err := c.attempt(addr, f)
		c.mu.Lock()
		delete(c.inflight, node)
		if err != nil {
			c.cool[node] = time.Now().Add(jitter(nodeCooldown))
		}
		c.mu.Unlock()
		if err != nil && c.ctx.Err() == nil {
			c.log.Warn(what+" failed", "node", node, "err", err)
			if onErr != nil {
				onErr(err)
			}
		}
		c.done()
		return nil
	})
	if !started {
		c.mu.Lock()
		delete(c.inflight, node)
		c.mu.Unlock()
	}
	return started
}

// attempt makes up to callAttempts tries, retrying only transient errors.
func (c *caller) attempt(addr string, f func(context.Context, agentv1.AgentClient) error) error {
	conn, err := c.tls.Dial(addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	cl := agentv1.NewAgentClient(conn)
	wait := callBackoff
	for i := 0; ; i++ {
		ctx, cancel := context.WithTimeout(c.ctx, rpcTimeout)
		err = f(ctx, cl)
		cancel()
		if err == nil || i+1 == callAttempts || !transient(err) || c.ctx.Err() != nil {
			return err
		}
		t := time.NewTimer(jitter(wait))
		select {
		case <-c.ctx.Done():
			t.Stop()
			return c.ctx.Err()
		case <-t.C:
		}
		wait *= 2
	}
}

// transient: an error another attempt may not meet (the agent restarting,
// a dropped connection); a refusal (stale epoch, busy node) is final.
func transient(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted:
		return true
	}
	return false
}

// jitter is d ±25 %.
func jitter(d time.Duration) time.Duration {
	return d*3/4 + time.Duration(rand.Int64N(int64(d)/2+1))
}

// wait returns once every call has ended (after the coordinator's context
// was cancelled, at once).
func (c *caller) wait() { _ = c.g.Wait() }
