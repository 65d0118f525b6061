package router

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/shoalhq/shoal/internal/kvhash"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// kvNoEventsRetry is how long a watcher waits before asking a head that has
// no KV events again (its next run may have them).
const kvNoEventsRetry = 10 * time.Second

// watchKV follows one head's KVEvents stream into the index, reconnecting
// until ctx ends. While it has no whole snapshot the replica is out of the
// index, and routing estimates its cache from the router's history.
func (h *Watcher) watchKV(ctx context.Context, cl replicav1.ReplicaClient, k HeadKey) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		var addr string
		stream, err := cl.KVEvents(ctx, &replicav1.KVEventsRequest{})
		if err == nil {
			err = h.followKV(stream, &addr, func() { backoff = 200 * time.Millisecond })
		}
		if addr != "" {
			h.kv.Drop(addr)
		}
		if ctx.Err() != nil {
			return
		}
		wait := backoff
		if status.Code(err) == codes.Unavailable || status.Code(err) == codes.Unimplemented {
			wait = kvNoEventsRetry // no events on this run, or a head from before them
		} else {
			h.log.Debug("kv events stream ended; resynchronising", "head", k.Node, "group", k.Group, "err", err)
			backoff = min(backoff*2, 5*time.Second)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// followKV applies one stream: snapshots (possibly in parts) replace the
// replica's blocks, events change them, and any break in the numbering ends
// the stream so that the next one starts from a snapshot.
func (h *Watcher) followKV(stream replicav1.Replica_KVEventsClient, addr *string, healthy func()) error {
	var seq uint64
	var head *replicav1.KVEventsMessage // the snapshot being assembled
	var blocks []uint64
	for {
		m, err := stream.Recv()
		if err != nil {
			return err
		}
		if m.Seq != seq+1 {
			return fmt.Errorf("kv events: message %d after %d", m.Seq, seq)
		}
		seq = m.Seq
		if m.Snapshot {
			if head == nil {
				head, blocks = m, nil
				if *addr != "" {
					h.kv.Drop(*addr) // the old view is void from here
					*addr = ""
				}
			}
			blocks = append(blocks, m.Blocks...)
			if m.More {
				continue
			}
			hs, err := kvhash.New(head.HashAlgo, head.HashSeed, int(head.BlockSize))
			if err == nil && head.Endpoint != "" {
				h.kv.Reset(head.Endpoint, hs, blocks, seq)
				*addr = head.Endpoint
				healthy()
			}
			// else: blocks not nameable yet (the engine's block size is
			// learnt from its first store); the next snapshot will be.
			head, blocks = nil, nil
			continue
		}
		if head != nil {
			return errors.New("kv events: events inside a snapshot")
		}
		if *addr == "" {
			continue
		}
		if !h.kv.Apply(*addr, seq, replicav1.EventsFromProto(m.Events)) {
			return errors.New("kv events: the index is out of step with the stream")
		}
	}
}
