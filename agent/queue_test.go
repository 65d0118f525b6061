package agent

import (
	"context"
	"testing"

	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestReplicaQueueStream: two routers on a head's Queue stream see each
// other's reports, not their own; a router's share leaves with its stream;
// a bad report ends the stream with INVALID_ARGUMENT.
func TestReplicaQueueStream(t *testing.T) {
	_, cl, ctx := replicaAPIOnLoopback(t)

	a, err := cl.Queue(ctx)
	require.NoError(t, err)
	first, err := a.Recv()
	require.NoError(t, err)
	require.Empty(t, first.Others, "nobody else reported yet")

	bctx, bcancel := context.WithCancel(ctx)
	b, err := cl.Queue(bctx)
	require.NoError(t, err)
	_, err = b.Recv() // its first state
	require.NoError(t, err)
	require.NoError(t, b.Send(&replicav1.QueueReport{Tokens: map[string]int64{"10.0.0.1:8000": 4096}}))
	got, err := a.Recv()
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"10.0.0.1:8000": 4096}, got.Others)

	require.NoError(t, a.Send(&replicav1.QueueReport{Tokens: map[string]int64{"10.0.0.1:8000": 1000}, Waiting: 2}))
	gotB, err := b.Recv()
	require.NoError(t, err)
	require.Equal(t, int64(1000), gotB.Others["10.0.0.1:8000"], "b sees a's report, not its own")
	require.Equal(t, int64(2), gotB.OthersWaiting, "and the requests a holds")

	bcancel() // b's router goes away: its 4,096 tokens with it
	got, err = a.Recv()
	require.NoError(t, err)
	require.Empty(t, got.Others)

	require.NoError(t, a.Send(&replicav1.QueueReport{Tokens: map[string]int64{"10.0.0.1:8000": -5}}))
	_, err = a.Recv()
	require.Equal(t, codes.InvalidArgument, status.Code(err), "a negative count: %v", err)
}
