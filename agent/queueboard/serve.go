package queueboard

import (
	"errors"
	"io"
	"maps"

	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Serve runs one router's Queue stream on b: each report it sends replaces
// its last, and it is sent the others' sum at once and on every change.
// Its share leaves the board with the stream. A bad report ends the stream
// with INVALID_ARGUMENT.
func Serve(b *Board, stream grpc.BidiStreamingServer[replicav1.QueueReport, replicav1.QueueState]) error {
	id, changed := b.Join()
	defer b.Leave(id)
	errc := make(chan error, 1)
	go func() { // ends with the stream: Recv fails once the handler returns
		for {
			m, err := stream.Recv()
			if err == nil {
				if err = b.Report(id, m.GetTokens(), m.GetWaiting()); err != nil {
					err = status.Error(codes.InvalidArgument, err.Error())
				}
			}
			if err != nil {
				errc <- err
				return
			}
		}
	}()
	var last map[string]int64
	var lastWaiting int64
	for {
		if o, w := b.Others(id); last == nil || !maps.Equal(o, last) || w != lastWaiting {
			if err := stream.Send(&replicav1.QueueState{Others: o, OthersWaiting: w}); err != nil {
				return err
			}
			last, lastWaiting = o, w
		}
		select {
		case <-stream.Context().Done():
			return nil
		case err := <-errc:
			if errors.Is(err, io.EOF) {
				return nil // the router is done
			}
			return err
		case <-changed:
		}
	}
}
