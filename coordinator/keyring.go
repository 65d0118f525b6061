package coordinator

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/gossip"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// keyringWait bounds how long a keyring change waits for every node.
const keyringWait = 30 * time.Second

// Keyring lists the nodes' gossip keys, or changes them cluster-wide and
// waits until every live node reports the change (install: holds the key;
// use: sends with it; remove: no longer holds it).
func (s *apiServer) Keyring(ctx context.Context, req *coordv1.KeyringRequest) (*coordv1.KeyringResponse, error) {
	op := req.Op
	var fp string
	switch op {
	case "list":
	case gossip.KeyInstall, gossip.KeyUse, gossip.KeyRemove:
		k, err := gossip.ParseKey(req.Key)
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		fp = gossip.Fingerprint(k)
		if err := s.c.mem.KeyringOp(op, req.Key); err != nil {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
	default:
		return nil, status.Errorf(codes.InvalidArgument, "keyring operation %q: one of list, install, use, remove", op)
	}
	done := func(t gossip.Tag) bool {
		keys := strings.Split(t.Keys, ",")
		switch op {
		case gossip.KeyInstall:
			return slices.Contains(keys, fp)
		case gossip.KeyUse:
			return keys[0] == fp
		case gossip.KeyRemove:
			return !slices.Contains(keys, fp)
		}
		return true
	}
	deadline := time.Now().Add(keyringWait)
	for {
		members := s.c.mem.Members()
		var lagging []string
		for id, t := range members {
			if !done(t) {
				lagging = append(lagging, id)
			}
		}
		if len(lagging) == 0 {
			msg := fmt.Sprintf("%s done on %d node(s)", op, len(members))
			if op == "list" {
				msg = fmt.Sprintf("%d node(s)", len(members))
			}
			return keyringResponse(members, msg), nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			sort.Strings(lagging)
			return nil, status.Errorf(codes.DeadlineExceeded, "%s of key %s not confirmed within %v by: %s (they may be partitioned; run it again, it is idempotent)",
				op, fp, keyringWait, strings.Join(lagging, ", "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func keyringResponse(members map[string]gossip.Tag, msg string) *coordv1.KeyringResponse {
	resp := &coordv1.KeyringResponse{Message: msg}
	for id, t := range members {
		n := &coordv1.KeyringNode{NodeId: id, Kind: kindName(t.Kind)}
		if t.Keys != "" {
			n.Keys = strings.Split(t.Keys, ",")
		}
		resp.Nodes = append(resp.Nodes, n)
	}
	sort.Slice(resp.Nodes, func(i, j int) bool { return resp.Nodes[i].NodeId < resp.Nodes[j].NodeId })
	return resp
}

func kindName(k string) string {
	switch k {
	case gossip.KindAgent:
		return "agent"
	case gossip.KindCoordinator:
		return "coordinator"
	case gossip.KindRouter:
		return "router"
	}
	return k
}
