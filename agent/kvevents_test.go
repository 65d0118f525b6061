package agent

import (
	"context"
	"testing"
	"time"

	"github.com/shoalhq/shoal/agent/kvrelay"
	"github.com/shoalhq/shoal/internal/kvevents"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// The Replica API's KVEvents stream over loopback: a snapshot (in chunks
// when large), then the changes numbered without gaps; UNAVAILABLE without
// KV events and when the run ends.
func TestReplicaKVEventsStream(t *testing.T) {
	s, cl, ctx := replicaAPIOnLoopback(t)

	s.update(&replicav1.Metrics{Serving: true}, nil, nil)
	st, err := cl.KVEvents(ctx, &replicav1.KVEventsRequest{})
	require.NoError(t, err)
	_, err = st.Recv()
	require.Equal(t, codes.Unavailable, status.Code(err), "no KV events: %v", err)

	relay := kvrelay.New(kvrelay.Info{Algo: "sha256_cbor", Seed: "9", BlockSize: 16, Endpoint: "10.0.0.1:8000"}, 0)
	big := make([]uint64, kvSnapshotChunk+10)
	for i := range big {
		big[i] = uint64(i + 1)
	}
	relay.Batch(0, kvevents.Batch{Events: []kvevents.Event{{Kind: kvevents.Stored, Hashes: big, BlockSize: 16}}})
	s.update(&replicav1.Metrics{Serving: true}, relay, nil)
	st, err = cl.KVEvents(ctx, &replicav1.KVEventsRequest{})
	require.NoError(t, err)
	m1, err := st.Recv()
	require.NoError(t, err)
	require.True(t, m1.Snapshot)
	require.True(t, m1.More, "a large snapshot comes in parts")
	require.Equal(t, uint64(1), m1.Seq)
	require.Equal(t, "sha256_cbor", m1.HashAlgo)
	require.Equal(t, "9", m1.HashSeed)
	require.Equal(t, uint32(16), m1.BlockSize)
	require.Equal(t, "10.0.0.1:8000", m1.Endpoint)
	m2, err := st.Recv()
	require.NoError(t, err)
	require.True(t, m2.Snapshot)
	require.False(t, m2.More)
	require.Equal(t, uint64(2), m2.Seq)
	require.Len(t, append(m1.Blocks, m2.Blocks...), len(big))

	relay.Batch(1, kvevents.Batch{Events: []kvevents.Event{{Kind: kvevents.Removed, Hashes: []uint64{1}}}})
	m3, err := st.Recv()
	require.NoError(t, err)
	require.Equal(t, uint64(3), m3.Seq)
	require.False(t, m3.Snapshot)
	require.Equal(t, []*replicav1.KVEvent{{Kind: replicav1.KVEvent_REMOVED, Hashes: []uint64{1}}}, stripped(m3.Events))

	relay.Lost(5, false) // a gap nobody could fill: an empty snapshot follows
	m4, err := st.Recv()
	require.NoError(t, err)
	require.True(t, m4.Snapshot)
	require.Empty(t, m4.Blocks)
	require.Equal(t, uint64(4), m4.Seq)

	relay.Close()
	_, err = st.Recv()
	require.Equal(t, codes.Unavailable, status.Code(err), "the run ended: %v", err)
}

// stripped copies events without protobuf's internal state, for Equal.
func stripped(evs []*replicav1.KVEvent) []*replicav1.KVEvent {
	out := make([]*replicav1.KVEvent, len(evs))
	for i, e := range evs {
		out[i] = &replicav1.KVEvent{Kind: e.Kind, Hashes: e.Hashes}
	}
	return out
}

// replicaAPIOnLoopback starts a head's Replica API on loopback and a client
// to it, with a 10 s context for the calls; all end with the test.
func replicaAPIOnLoopback(t *testing.T) (*replicaServer, replicav1.ReplicaClient, context.Context) {
	addr := freeAddr(t)
	s := newReplicaServer(addr, quietLog, nil)
	s.start()
	t.Cleanup(s.wait)
	t.Cleanup(s.stop)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return s, replicav1.NewReplicaClient(conn), ctx
}
