package router

import (
	"context"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/shoalhq/shoal/internal/kvhash"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func vllmHasher(t testing.TB) *kvhash.Namer {
	h, err := kvhash.NewVLLM("1", 4)
	require.NoError(t, err)
	return h
}

func TestKVIndexApply(t *testing.T) {
	x := NewKVIndex(0)
	h := vllmHasher(t)
	x.Reset("a", h, []uint64{1, 2, 3}, 10)
	n, ok := x.Match("a", []uint64{1, 2, 9, 3})
	require.True(t, ok)
	require.Equal(t, 2, n, "the run of leading blocks held")
	_, ok = x.Match("b", []uint64{1})
	require.False(t, ok, "a replica without events is not in the index")

	for _, tc := range []struct {
		seq   uint64
		evs   []kvevents.Event
		ok    bool
		match int
	}{
		{12, nil, false, 2}, // a gap: refused, nothing changes
		{11, []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{9}}}, true, 4},
		{12, []kvevents.Event{{Kind: kvevents.Removed, Hashes: []uint64{2}}}, true, 1},
		{13, []kvevents.Event{{Kind: kvevents.Cleared}, {Kind: kvevents.Stored, Hashes: []uint64{1, 2}}}, true, 2},
		{13, nil, false, 2}, // a repeat
	} {
		require.Equal(t, tc.ok, x.Apply("a", tc.seq, tc.evs), "seq %d", tc.seq)
		n, _ := x.Match("a", []uint64{1, 2, 9, 3})
		require.Equal(t, tc.match, n, "after seq %d", tc.seq)
	}
	require.Equal(t, KVIndexStats{Replicas: 1, Blocks: 2, Bytes: 2 * KVBytesPerBlock, Max: DefaultKVIndexBlocks}, x.Stats())
	x.Drop("a")
	require.False(t, x.Apply("a", 14, nil), "dropped: a snapshot first")
	require.Equal(t, 0, x.Stats().Blocks)
}

func TestKVIndexBound(t *testing.T) {
	x := NewKVIndex(5)
	h := vllmHasher(t)
	x.Reset("a", h, []uint64{1, 2, 3}, 0)
	x.Reset("b", h, []uint64{1, 2, 3, 4}, 0)
	st := x.Stats()
	require.Equal(t, 5, st.Blocks, "never more than the bound")
	require.Equal(t, uint64(2), st.Dropped)
	x.Reset("a", h, nil, 0) // a's blocks freed: room again
	require.True(t, x.Apply("b", 1, []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{3, 4}}}))
	n, _ := x.Match("b", []uint64{1, 2, 3, 4})
	require.Equal(t, 4, n)
	x.SetMax(2) // lowered under what is held: nothing is dropped, nothing new is kept
	require.True(t, x.Apply("b", 2, []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{5}}}))
	require.Equal(t, 4, x.Stats().Blocks)
	require.Equal(t, 2, x.Stats().Max)
	x.SetMax(0)
	require.Equal(t, 2, x.Stats().Max, "0 leaves the bound as it is")
}

// TestKVIndexMemory holds KVBytesPerBlock to what the index really costs:
// the heap grown by a million blocks over two replicas, given as snapshots
// (maps sized at once) and as events one block at a time (maps that grew).
func TestKVIndexMemory(t *testing.T) {
	const n = 1 << 20
	h := vllmHasher(t)
	for _, grown := range []bool{false, true} {
		var ms0, ms1 runtime.MemStats
		x := NewKVIndex(0)
		blocks := make([]uint64, n/2)
		ev := []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{0}}}
		runtime.GC()
		runtime.ReadMemStats(&ms0)
		for r, name := range []string{"a", "b"} {
			for i := range blocks {
				blocks[i] = uint64(r*n + i + 1)
			}
			if !grown {
				x.Reset(name, h, blocks, 0)
				continue
			}
			x.Reset(name, h, nil, 0)
			for i, b := range blocks {
				ev[0].Hashes[0] = b
				require.True(t, x.Apply(name, uint64(i+1), ev))
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&ms1)
		per := float64(ms1.HeapAlloc-ms0.HeapAlloc-uint64(8*len(blocks))) / n
		t.Logf("KV INDEX (grown %v): %.1f bytes per block (%d blocks; reported %d bytes)", grown, per, x.Stats().Blocks, x.Stats().Bytes)
		require.Equal(t, n, x.Stats().Blocks)
		require.LessOrEqual(t, per, float64(KVBytesPerBlock), "KVBytesPerBlock must cover a block's real cost")
		runtime.KeepAlive(x)
		runtime.KeepAlive(blocks)
	}
}

// fakeHead serves KVEvents streams from a script, one per connection.
type fakeHead struct {
	replicav1.UnimplementedReplicaServer
	mu      sync.Mutex
	scripts [][]*replicav1.KVEventsMessage
	calls   int
	hold    chan struct{}
}

func (f *fakeHead) KVEvents(_ *replicav1.KVEventsRequest, st replicav1.Replica_KVEventsServer) error {
	f.mu.Lock()
	i := f.calls
	f.calls++
	f.mu.Unlock()
	if i >= len(f.scripts) {
		<-st.Context().Done()
		return nil
	}
	for _, m := range f.scripts[i] {
		if err := st.Send(m); err != nil {
			return err
		}
	}
	if i == len(f.scripts)-1 {
		select {
		case <-f.hold:
		case <-st.Context().Done():
		}
	}
	return nil // the stream ends: the watcher must resynchronise
}

// TestWatcherResyncsAfterAGap: a stream that skips a number is left, the
// replica falls out of the index until the next stream's snapshot, which
// then holds; a snapshot in parts is whole only at its last part; a
// snapshot whose blocks cannot be named leaves the replica out.
func TestWatcherResyncsAfterAGap(t *testing.T) {
	snap := func(seq uint64, more bool, blocks ...uint64) *replicav1.KVEventsMessage {
		return &replicav1.KVEventsMessage{Seq: seq, Snapshot: true, More: more, Blocks: blocks, HashAlgo: "sha256_cbor", HashSeed: "1", BlockSize: 4, Endpoint: "10.0.0.1:8000"}
	}
	stored := func(seq uint64, hs ...uint64) *replicav1.KVEventsMessage {
		return &replicav1.KVEventsMessage{Seq: seq, Events: []*replicav1.KVEvent{{Kind: replicav1.KVEvent_STORED, Hashes: hs}}}
	}
	unnamed := snap(1, false, 5)
	unnamed.BlockSize = 0
	f := &fakeHead{hold: make(chan struct{}), scripts: [][]*replicav1.KVEventsMessage{
		{unnamed, stored(2, 6)},                             // not nameable: ignored
		{snap(1, true, 1), snap(2, false, 2), stored(4, 3)}, // a gap after the snapshot
		{snap(1, true, 1), snap(2, false, 2), stored(3, 3)}, // whole
	}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer()
	replicav1.RegisterReplicaServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	w := NewWatcher(quietLog(), func() {}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.watchKV(ctx, replicav1.NewReplicaClient(conn), HeadKey{Node: "n", Group: "g"})
	}()
	require.Eventually(t, func() bool {
		n, ok := w.KV().Match("10.0.0.1:8000", []uint64{1, 2, 3})
		return ok && n == 3
	}, 20*time.Second, 10*time.Millisecond)
	f.mu.Lock()
	require.Equal(t, 3, f.calls, "the unnameable and the gapped streams were left")
	f.mu.Unlock()
	close(f.hold)
	require.Eventually(t, func() bool { _, ok := w.KV().Hasher("10.0.0.1:8000"); return !ok }, 10*time.Second, 10*time.Millisecond,
		"a stream that ends takes the replica out of the index")
	cancel()
	<-done
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestNameBlocksOncePerRule: replicas whose engines name blocks alike share
// one computation of a prompt's names; another seed is another.
func TestNameBlocksOncePerRule(t *testing.T) {
	x := NewKVIndex(0)
	for _, a := range []string{"a", "b"} {
		x.Reset(a, vllmHasher(t), nil, 0) // distinct hashers, equal settings
	}
	other, err := kvhash.NewVLLM("2", 4)
	require.NoError(t, err)
	x.Reset("c", other, nil, 0)
	h := hint{tokens: []uint32{1, 2, 3, 4, 5, 6, 7, 8}}
	h.nameBlocks(x, []*Endpoint{{Addr: "a"}, {Addr: "b"}, {Addr: "c"}, {Addr: "no-events"}})
	require.Len(t, h.keys, 2)
	require.Equal(t, vllmHasher(t).Keys(h.tokens, ""), h.keys[*vllmHasher(t)])
}
