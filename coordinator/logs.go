package coordinator

import (
	"errors"
	"fmt"
	"io"

	"github.com/shoalhq/shoal/coordinator/store"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Logs relays a replica member's engine logs from its agent.
func (s *apiServer) Logs(req *coordv1.LogsRequest, stream coordv1.Coordinator_LogsServer) error {
	groups, err := s.c.store.Groups()
	if err != nil {
		return apiError(err)
	}
	var g *store.Group
	for _, x := range groups {
		if x.ID == req.Replica {
			g = x
		}
	}
	if g == nil {
		return apiError(fmt.Errorf("replica %q: %w (see `shoal get replicas`)", req.Replica, store.ErrNotFound))
	}
	node := req.NodeId
	if node == "" {
		node = g.Members[0].NodeID
		if v, ok := s.c.heads.Views()[g.ID]; ok && v.Key.Epoch == g.Epoch {
			node = v.Key.Node
		}
	}
	var addr string
	for _, m := range g.Members {
		if m.NodeID == node {
			addr = m.GRPC
		}
	}
	if addr == "" {
		return apiError(fmt.Errorf("node %q is not a member of %s: %w", node, g.ID, store.ErrNotFound))
	}
	conn, err := s.c.cfg.TLS.Dial(addr)
	if err != nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	defer conn.Close()
	in, err := agentv1.NewAgentClient(conn).Logs(stream.Context(), &agentv1.LogsRequest{Name: req.Name, Follow: req.Follow, TailBytes: req.TailBytes})
	if err != nil {
		return err
	}
	for {
		c, err := in.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
				return err // the agent's own error (NotFound, …) reaches the user as it is
			}
			return status.Errorf(codes.Unavailable, "node %s: %v", node, err)
		}
		if err := stream.Send(&coordv1.LogChunk{NodeId: node, Name: c.Name, Data: c.Data}); err != nil {
			return err
		}
	}
}
