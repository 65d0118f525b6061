package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/shoalhq/shoal/gpu"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	"github.com/shoalhq/shoal/spec"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	errStale = errors.New("stale assignment")
	errBusy  = errors.New("node busy")
	errFit   = errors.New("node does not fit")
)

// grpcError is the one mapping from agent errors to gRPC codes.
func grpcError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, spec.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, errStale):
		return status.Error(codes.Aborted, err.Error())
	case errors.Is(err, errBusy), errors.Is(err, errFit):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.Unavailable, err.Error())
	default:
		return status.Error(codes.Internal, err.Error())
	}
}

type agentServer struct {
	agentv1.UnimplementedAgentServer
	a *Agent
}

// assignmentFromProto validates an Assign request against this node.
func assignmentFromProto(self string, inv *gpu.Inventory, p *agentv1.Assignment) (*Assignment, error) {
	if p == nil || p.GroupId == "" || p.Epoch == 0 || p.Deployment == "" {
		return nil, fmt.Errorf("%w: assignment needs deployment, group_id and epoch > 0", spec.ErrInvalid)
	}
	d, err := spec.FromJSON(p.SpecJson)
	if err != nil {
		return nil, err
	}
	as := &Assignment{Deployment: p.Deployment, Group: p.GroupId, Epoch: p.Epoch, Rank: int(p.Rank), Spec: d}
	seen := map[string]bool{}
	ranks := map[int32]bool{}
	found := false
	for _, m := range p.Members {
		if m.NodeId == "" || seen[m.NodeId] || ranks[m.Rank] || m.GrpcAddr == "" {
			return nil, fmt.Errorf("%w: members must have unique ids, unique ranks and addresses", spec.ErrInvalid)
		}
		seen[m.NodeId], ranks[m.Rank] = true, true
		if m.NodeId == self {
			found = m.Rank == p.Rank
		}
		as.Members = append(as.Members, Member{NodeID: m.NodeId, Rank: int(m.Rank), GRPC: m.GrpcAddr})
	}
	if !found {
		return nil, fmt.Errorf("%w: this node (%s) is not a member at rank %d", spec.ErrInvalid, self, p.Rank)
	}
	if len(as.Members) != d.Resources.Nodes {
		return nil, fmt.Errorf("%w: %d members for a %d-node replica", spec.ErrInvalid, len(as.Members), d.Resources.Nodes)
	}
	if n := len(inv.Devices); n < d.Resources.GPUsPerNode {
		return nil, fmt.Errorf("%w: replica needs %d GPUs per node, this node has %d", errFit, d.Resources.GPUsPerNode, n)
	}
	if want := d.Resources.GPUModel; want != "" && want != inv.Model() {
		return nil, fmt.Errorf("%w: replica needs %s GPUs, this node has %q", errFit, want, inv.Model())
	}
	return as, nil
}

func (s *agentServer) Assign(ctx context.Context, req *agentv1.AssignRequest) (*agentv1.AssignResponse, error) {
	s.a.mu.Lock()
	inv := s.a.hw.GPU
	s.a.mu.Unlock()
	as, err := assignmentFromProto(s.a.cfg.NodeID, inv, req.GetAssignment())
	if err != nil {
		return nil, grpcError(err)
	}
	err = s.a.do(ctx, func() error { return s.a.applyAssignment(as) })
	return &agentv1.AssignResponse{}, grpcError(err)
}

func (s *agentServer) Release(ctx context.Context, req *agentv1.ReleaseRequest) (*agentv1.ReleaseResponse, error) {
	if req.GetGroupId() == "" {
		return nil, status.Error(codes.InvalidArgument, "release needs group_id")
	}
	err := s.a.do(ctx, func() error { return s.a.release(req.GroupId, req.Epoch) })
	return &agentv1.ReleaseResponse{}, grpcError(err)
}

func (s *agentServer) Status(context.Context, *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	resp := &agentv1.StatusResponse{NodeId: a.cfg.NodeID, Address: a.cfg.Address, DriverVersion: a.hw.GPU.DriverVersion}
	for _, d := range a.hw.GPU.Devices {
		resp.Gpus = append(resp.Gpus, &agentv1.GPU{Index: int32(d.Index), Uuid: d.UUID, Name: d.Name, MemoryMib: d.MemoryMiB, Healthy: d.Healthy})
	}
	resp.InventoryJson, _ = json.Marshal(a.hw)
	if as := a.state.Assignment; as != nil {
		pa := &agentv1.Assignment{Deployment: as.Deployment, GroupId: as.Group, Epoch: as.Epoch, Rank: int32(as.Rank), SpecJson: as.Spec.JSON()}
		for _, m := range as.Members {
			pa.Members = append(pa.Members, &agentv1.Member{NodeId: m.NodeID, Rank: int32(m.Rank), GrpcAddr: m.GRPC})
		}
		resp.Assignment = pa
		switch {
		case a.claim > 0:
			resp.Role = "head"
		case a.follow != "":
			resp.Role = "worker"
		}
	}
	resp.EngineState, resp.HeadNodeId, resp.Term, resp.Message = a.es, a.follow, a.fterm, a.msg
	return resp, nil
}
