package runner

import (
	"time"

	"github.com/shoalhq/shoal/agent/kvrelay"
	"github.com/shoalhq/shoal/engine"
)

// kvRetry is how long the head waits before listening for its engine's KV
// events again after the subscriber stopped on an error; it doubles up to
// kvRetryMax while the errors go on (a port taken by another process).
const (
	kvRetry    = time.Second
	kvRetryMax = 30 * time.Second
)

// newRelay is the head's relay of its engine's KV events; nil when the plan
// has none.
func (r *Runner) newRelay() *kvrelay.Relay {
	k := r.cfg.Plan.KVEvents
	if r.cfg.Role != engine.RoleHead || k == nil || r.cfg.KVSubscribe == nil {
		return nil
	}
	return kvrelay.New(kvrelay.Info{Algo: k.Algo, Seed: k.Seed, BlockSize: k.BlockSize, Endpoint: r.cfg.Plan.Endpoint}, 0)
}

// kvLoop hears the engine's KV events for the whole run (from before the
// engine starts: it connects to the head when it comes up), and starts
// listening again after an error. An engine that restarts within the run
// numbers its batches from 0 again; the subscriber sees that.
func (r *Runner) kvLoop() {
	k := r.cfg.Plan.KVEvents
	wait := kvRetry
	for r.ctx.Err() == nil {
		began := time.Now()
		err := r.cfg.KVSubscribe(r.ctx, r.kv)
		if err == nil || r.ctx.Err() != nil {
			return
		}
		if time.Since(began) > kvRetryMax {
			wait = kvRetry // it had been working: start the backoff again
		}
		r.log.Warn("kv events from the engine stopped; listening again", "endpoint", k.Endpoint, "err", err, "in", wait)
		r.kv.Lost(0, false)
		if !r.sleep(wait) {
			return
		}
		wait = min(2*wait, kvRetryMax)
	}
}

// KV is the run's relay of its engine's KV events (nil: none).
func (r *Runner) KV() *kvrelay.Relay { return r.kv }
