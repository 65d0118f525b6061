package runner

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/shoalhq/shoal/engine"
	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/stretchr/testify/require"
)

// TestKVLoopBacksOffAndEndsWithTheRun: a subscriber that fails (its port
// taken) is started again after 1 s, 2 s, 4 s …; each failure drops what the
// relay knew; the relay and the loop end with the run.
func TestKVLoopBacksOffAndEndsWithTheRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := headConfig(&fakeRuntime{}, &fakeProber{}, nil)
		cfg.Plan.KVEvents = &engine.KVEvents{Endpoint: "tcp://127.0.0.1:18000", Algo: "sha256_cbor", Seed: "1", BlockSize: 16}
		var starts []time.Duration
		begin := time.Now()
		cfg.KVSubscribe = func(ctx context.Context, h kvevents.Handler) error {
			starts = append(starts, time.Since(begin))
			if len(starts) <= 3 {
				return errors.New("address already in use")
			}
			h.Batch(0, kvevents.Batch{Events: []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{1}, BlockSize: 16}}})
			<-ctx.Done()
			return nil
		}
		r := newRun(t, cfg)
		require.NotNil(t, r.KV())
		r.Start()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		require.Equal(t, []time.Duration{0, time.Second, 3 * time.Second, 7 * time.Second}, starts)
		st, blocks := r.KV().Stats()
		require.Equal(t, uint64(3), st.Lost)
		require.Equal(t, 1, blocks)
		_, ch, _, cancel := r.KV().Subscribe()
		defer cancel()
		stopAndWait(t, r)
		_, open := <-ch
		require.False(t, open, "the run's end closed the relay")
	})
}

// TestNoKVRelayWithoutASubscriber: a plan with events but no way to hear
// them (or a worker) relays nothing.
func TestNoKVRelayWithoutASubscriber(t *testing.T) {
	cfg := headConfig(&fakeRuntime{}, &fakeProber{}, nil)
	cfg.Plan.KVEvents = &engine.KVEvents{Endpoint: "tcp://127.0.0.1:18000"}
	require.Nil(t, New(cfg).KV())
	cfg.KVSubscribe = func(context.Context, kvevents.Handler) error { return nil }
	cfg.Role = engine.RoleWorker
	require.Nil(t, New(cfg).KV())
}
