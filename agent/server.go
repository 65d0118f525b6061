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
	// errDeposed: a command from a coordinator leader older than one this
	// node has obeyed.
	errDeposed = errors.New("command from a deposed coordinator leader")
)

// grpcError is the one mapping from agent errors to gRPC codes.
func grpcError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, spec.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, errStale), errors.Is(err, errDeposed):
		return status.Error(codes.Aborted, err.Error())
	case errors.Is(err, errBusy), errors.Is(err, errFit):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded), errors.Is(err, errExiting):
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

// statusSnapshot is what the API reads without the loop: the Status answer
// (whole, and brief: without the hardware) and the inventory an Assign is
// checked against. Never changed once published.
type statusSnapshot struct {
	resp  *agentv1.StatusResponse
	brief *agentv1.StatusResponse
	inv   *gpu.Inventory
	hw    *HostInventory
	json  []byte // hw as JSON, reused while hw is the same
}

// statusKey is what the Status snapshot depends on.
type statusKey struct {
	loc      Local
	hw       *HostInventory
	stopping bool
}

// publishStatus rebuilds the snapshot from the loop's state when it
// changed. Loop only.
func (a *Agent) publishStatus() {
	key := statusKey{loc: a.loc, hw: a.hw, stopping: a.run != nil && a.run.r.Status().Stopping}
	prev := a.status.Load()
	if prev != nil && key == a.shown {
		return
	}
	a.shown = key
	snap := &statusSnapshot{hw: a.hw}
	resp := &agentv1.StatusResponse{NodeId: a.cfg.NodeID, Address: a.cfg.Address}
	if a.hw != nil {
		snap.inv = a.hw.GPU
		resp.DriverVersion = a.hw.GPU.DriverVersion
		for _, d := range a.hw.GPU.Devices {
			resp.Gpus = append(resp.Gpus, &agentv1.GPU{Index: int32(d.Index), Uuid: d.UUID, Name: d.Name, MemoryMib: d.MemoryMiB, Healthy: d.Healthy})
		}
		if prev != nil && prev.hw == a.hw {
			snap.json = prev.json
		} else {
			snap.json, _ = json.Marshal(a.hw)
		}
		resp.InventoryJson = snap.json
	}
	l := a.loc
	if as := l.As; as != nil {
		pa := &agentv1.Assignment{Deployment: as.Deployment, GroupId: as.Group, Epoch: as.Epoch, Rank: int32(as.Rank), SpecJson: as.Spec.JSON()}
		if prev != nil && prev.resp.Assignment != nil && prev.resp.Assignment.GroupId == as.Group && prev.resp.Assignment.Epoch == as.Epoch {
			pa = prev.resp.Assignment // immutable: the same assignment's message is reused
		} else {
			for _, m := range as.Members {
				pa.Members = append(pa.Members, &agentv1.Member{NodeId: m.NodeID, Rank: int32(m.Rank), GrpcAddr: m.GRPC})
			}
		}
		resp.Assignment = pa
		switch {
		case l.Claim > 0:
			resp.Role = "head"
		case l.Follow != "":
			resp.Role = "worker"
		}
	}
	resp.EngineState, resp.HeadNodeId, resp.Term, resp.Message = l.ES, l.Follow, l.FTerm, l.Msg
	resp.Draining = l.Draining
	resp.Stopping = a.run != nil && a.run.r.Status().Stopping
	snap.resp = resp
	snap.brief = &agentv1.StatusResponse{NodeId: resp.NodeId, Address: resp.Address, Assignment: resp.Assignment, Role: resp.Role,
		EngineState: resp.EngineState, HeadNodeId: resp.HeadNodeId, Term: resp.Term, Message: resp.Message, Draining: resp.Draining, Stopping: resp.Stopping}
	a.status.Store(snap)
}

// Assign validates the assignment, hands it to the loop and answers once it
// is durable. It never waits for an engine to stop or start.
func (s *agentServer) Assign(ctx context.Context, req *agentv1.AssignRequest) (*agentv1.AssignResponse, error) {
	as, err := assignmentFromProto(s.a.cfg.NodeID, s.a.status.Load().inv, req.GetAssignment())
	if err != nil {
		return nil, grpcError(err)
	}
	err = s.durable(ctx, func() (uint64, error) {
		if err := s.a.fenced(req.GetCoordinatorTerm()); err != nil {
			return 0, err
		}
		return s.a.applyAssignment(as)
	})
	return &agentv1.AssignResponse{}, grpcError(err)
}

// durable runs f on the loop, then waits until the state it produced is on
// disk. The Status snapshot is rebuilt before the answer, so a caller reads
// its own write: Status right after Assign shows the assignment, without
// waiting for the loop's next step.
func (s *agentServer) durable(ctx context.Context, f func() (uint64, error)) error {
	var gen uint64
	err := s.a.do(ctx, func() error {
		var err error
		if gen, err = f(); err == nil {
			s.a.publishStatus()
		}
		return err
	})
	if err != nil {
		return err
	}
	return s.a.store.Wait(ctx, gen)
}

func (s *agentServer) Release(ctx context.Context, req *agentv1.ReleaseRequest) (*agentv1.ReleaseResponse, error) {
	if req.GetGroupId() == "" {
		return nil, status.Error(codes.InvalidArgument, "release needs group_id")
	}
	err := s.durable(ctx, func() (uint64, error) {
		if err := s.a.fenced(req.GetCoordinatorTerm()); err != nil {
			return 0, err
		}
		return s.a.release(req.GroupId, req.Epoch), nil
	})
	return &agentv1.ReleaseResponse{}, grpcError(err)
}

func (s *agentServer) Drain(ctx context.Context, req *agentv1.DrainRequest) (*agentv1.DrainResponse, error) {
	if req.GetGroupId() == "" || req.GetEpoch() == 0 {
		return nil, status.Error(codes.InvalidArgument, "drain needs group_id and epoch")
	}
	err := s.durable(ctx, func() (uint64, error) {
		if err := s.a.fenced(req.GetCoordinatorTerm()); err != nil {
			return 0, err
		}
		return s.a.drain(req.GroupId, req.Epoch)
	})
	return &agentv1.DrainResponse{}, grpcError(err)
}

// SetAdapters takes the coordinator's word on this replica's adapters.
func (s *agentServer) SetAdapters(ctx context.Context, req *agentv1.SetAdaptersRequest) (*agentv1.SetAdaptersResponse, error) {
	if req.GetGroupId() == "" || req.GetEpoch() == 0 {
		return nil, status.Error(codes.InvalidArgument, "set adapters needs group_id and epoch")
	}
	err := s.a.do(ctx, func() error {
		if err := s.a.fenced(req.GetCoordinatorTerm()); err != nil {
			return err
		}
		return s.a.setAdapters(req)
	})
	return &agentv1.SetAdaptersResponse{}, grpcError(err)
}

// Status answers from the loop's last snapshot, without waiting for it.
func (s *agentServer) Status(_ context.Context, req *agentv1.StatusRequest) (*agentv1.StatusResponse, error) {
	if req.GetBrief() {
		return s.a.status.Load().brief, nil
	}
	return s.a.status.Load().resp, nil
}
