package kvrelay

import (
	"sort"
	"testing"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func stored(bs int, hs ...uint64) kvevents.Event {
	return kvevents.Event{Kind: kvevents.Stored, Hashes: hs, BlockSize: bs}
}

func removed(hs ...uint64) kvevents.Event { return kvevents.Event{Kind: kvevents.Removed, Hashes: hs} }

func sorted(b []uint64) []uint64 {
	b = append([]uint64(nil), b...)
	sort.Slice(b, func(i, j int) bool { return b[i] < b[j] })
	return b
}

func TestSnapshotThenChanges(t *testing.T) {
	r := New(Info{Algo: "sha256_cbor", Seed: "1", BlockSize: 16, Endpoint: "10.0.0.1:8000"}, 0)
	r.Batch(0, kvevents.Batch{Events: []kvevents.Event{stored(16, 1, 2, 3)}})
	snap, ch, _, cancel := r.Subscribe()
	defer cancel()
	require.Equal(t, uint64(1), snap.Seq)
	require.Equal(t, []uint64{1, 2, 3}, sorted(snap.Blocks))
	require.Equal(t, 16, snap.Info.BlockSize)
	r.Batch(1, kvevents.Batch{Events: []kvevents.Event{removed(2), stored(16, 4)}})
	c := <-ch
	require.Equal(t, uint64(2), c.Seq)
	require.Nil(t, c.Reset)
	require.Len(t, c.Events, 2)
	// A late subscriber sees the cache as it is now.
	snap2, _, _, cancel2 := r.Subscribe()
	defer cancel2()
	require.Equal(t, []uint64{1, 3, 4}, sorted(snap2.Blocks))
	require.Equal(t, uint64(2), snap2.Seq)
	// Cleared empties it.
	r.Batch(2, kvevents.Batch{Events: []kvevents.Event{{Kind: kvevents.Cleared}}})
	<-ch
	_, n := r.Stats()
	require.Zero(t, n)
}

func TestLostAndBlockSizeReset(t *testing.T) {
	r := New(Info{Algo: "sha256_cbor", Seed: "1"}, 0) // block size unknown
	_, ch, _, cancel := r.Subscribe()
	defer cancel()
	r.Batch(0, kvevents.Batch{Events: []kvevents.Event{stored(64, 7, 8)}})
	c := <-ch
	require.NotNil(t, c.Reset, "the block size became known: a new snapshot")
	require.Equal(t, 64, c.Reset.Info.BlockSize)
	require.Equal(t, []uint64{7, 8}, sorted(c.Reset.Blocks))
	r.Lost(9, false)
	c = <-ch
	require.NotNil(t, c.Reset)
	require.Empty(t, c.Reset.Blocks, "after a gap nothing known is trusted")
	st, _ := r.Stats()
	require.Equal(t, uint64(1), st.Lost)
}

func TestSlowSubscriberIsCutAndLimitHolds(t *testing.T) {
	r := New(Info{BlockSize: 16}, 10)
	_, ch, overrun, cancel := r.Subscribe()
	defer cancel()
	for i := 0; i < subscriberBuffer+1; i++ {
		r.Batch(uint64(i), kvevents.Batch{Events: []kvevents.Event{stored(16, uint64(i))}})
	}
	n := 0
	for range ch {
		n++
	}
	require.Equal(t, subscriberBuffer, n, "the buffer, then the stream ends")
	require.True(t, overrun())
	st, held := r.Stats()
	require.Equal(t, 10, held, "never more blocks than the limit")
	require.Equal(t, uint64(subscriberBuffer+1-10), st.OverLimit)
	require.Equal(t, uint64(1), st.Overruns)
	r.Close()
	_, ch2, _, cancel2 := r.Subscribe()
	defer cancel2()
	_, open := <-ch2
	require.False(t, open, "a closed relay gives closed subscriptions")
}
