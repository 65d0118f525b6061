package gossip

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"

	"github.com/shoalhq/shoal/nodesource/slurm"
)

// MetaMaxSize is memberlist's limit on node metadata (memberlist.MetaMaxSize).
const MetaMaxSize = 512

// TagVersion is the codec version; a peer with another version is rejected.
const TagVersion = 1

// Node kinds in gossip.
const (
	KindAgent       = "a"
	KindCoordinator = "c"
	KindRouter      = "r"
)

// Engine states advertised in tags.
const (
	EngineIdle        = ""
	EngineWaiting     = "waiting"     // head: claimed, waiting for all members to follow
	EngineStarting    = "starting"    // a run began: runtime, image, processes being started
	EngineDownloading = "downloading" // pulling weights before the engine starts
	EngineRunning     = "running"     // the node process runs (head: workers may join)
	EngineLoading     = "loading"     // head: vllm serve started, not ready yet
	EngineReady       = "ready"       // head: /health, /v1/models and the canary passed
	EngineFailed      = "failed"
)

// Tag is the compact state every node gossips. Short JSON keys keep it well
// under MetaMaxSize; richer inventory goes over the Agent gRPC API.
type Tag struct {
	V          int    `json:"v"`
	Cluster    string `json:"c"`
	Kind       string `json:"t"`
	ID         string `json:"id"`
	GRPC       string `json:"a"`
	Replica    string `json:"r,omitempty"`
	GPUModel   string `json:"gm,omitempty"`
	GPUs       int    `json:"gn,omitempty"`
	Healthy    bool   `json:"h,omitempty"`
	Deployment string `json:"d,omitempty"`
	Group      string `json:"g,omitempty"`
	Epoch      uint64 `json:"e,omitempty"`
	Rank       int    `json:"k,omitempty"`
	Size       int    `json:"n,omitempty"`
	HeadTerm   uint64 `json:"ht,omitempty"`
	Follow     string `json:"f,omitempty"`
	FollowTerm uint64 `json:"ft,omitempty"`
	Engine     string `json:"es,omitempty"`
	Weights    bool   `json:"w,omitempty"`
	// RDMA summarises the active RDMA ports ("8×400G IB"); empty when none.
	RDMA string `json:"rd,omitempty"`
	// Progress is a weight pull's "percent rate" ("43 12.1GB/s") while
	// Engine is downloading.
	Progress string `json:"pg,omitempty"`
	// Metrics is the agent's Prometheus address, for service discovery.
	Metrics string `json:"m,omitempty"`
	// Keys are the fingerprints of the node's gossip keys, primary first,
	// so keyring rotation can be watched converge.
	Keys string `json:"kr,omitempty"`
	// GPUMemGiB is the smallest GPU's memory, for placement.
	GPUMemGiB int `json:"gm2,omitempty"`
	// Restarting: the agent is exiting and leaves its engines running for
	// the next agent process (a head waits longer for such a member).
	Restarting bool `json:"rs,omitempty"`
	// Stopping: an engine run on this node is still being stopped; its GPUs
	// are not free yet (placement waits for it).
	Stopping bool `json:"st,omitempty"`
	// Draining: this head takes no new requests (scale-in); in-flight ones
	// finish. Every router reads it from here or from the Replica stream.
	Draining bool `json:"dr,omitempty"`
	// SlurmJob is the Slurm job the agent runs in; SlurmEnd the job's end
	// (Unix seconds). Leaving: the job was signalled (its time limit is
	// near, or it is preempted or cancelled) and the node will be gone soon.
	// PortBand is the job's port band (0: none); it is not sent, since the
	// job id says it (slurm.PortBand), and DecodeTag derives it.
	SlurmJob string `json:"sj,omitempty"`
	// SlurmNodes is the job's node list as Slurm writes it ("gpu[001-016]"),
	// cut to MaxSlurmNodes bytes; left out of a tag it would push over
	// MetaMaxSize (it is informational: squeue says it too).
	SlurmNodes string `json:"sl,omitempty"`
	SlurmEnd   int64  `json:"se,omitempty"`
	PortBand   int    `json:"-"`
	Leaving    bool   `json:"lv,omitempty"`
}

// MaxSlurmNodes bounds Tag.SlurmNodes, so that a long node list cannot
// push the tag over MetaMaxSize.
const MaxSlurmNodes = 96

// ErrBadTag is wrapped by every decode failure.
var ErrBadTag = errors.New("bad gossip tag")

// Encode returns the tag's wire form, or an error if it would not fit.
func (t Tag) Encode() ([]byte, error) {
	t.V = TagVersion
	b, err := json.Marshal(t)
	if err != nil {
		return nil, err
	}
	if len(b) > MetaMaxSize && t.SlurmNodes != "" {
		t.SlurmNodes = ""
		if b, err = json.Marshal(t); err != nil {
			return nil, err
		}
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("gossip tag is %d bytes, over memberlist's %d-byte limit; shorten node id, group or cluster name", len(b), MetaMaxSize)
	}
	return b, nil
}

// DecodeTag parses and checks a peer's tag.
func DecodeTag(b []byte) (Tag, error) {
	var t Tag
	if len(b) == 0 {
		return t, fmt.Errorf("%w: empty", ErrBadTag)
	}
	if len(b) > MetaMaxSize {
		return t, fmt.Errorf("%w: %d bytes", ErrBadTag, len(b))
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return t, fmt.Errorf("%w: %w", ErrBadTag, err)
	}
	switch {
	case t.V != TagVersion:
		return t, fmt.Errorf("%w: version %d, want %d", ErrBadTag, t.V, TagVersion)
	case t.ID == "":
		return t, fmt.Errorf("%w: no node id", ErrBadTag)
	case t.Kind != KindAgent && t.Kind != KindCoordinator && t.Kind != KindRouter:
		return t, fmt.Errorf("%w: unknown kind %q", ErrBadTag, t.Kind)
	case t.GPUs < 0 || t.Rank < 0 || t.Size < 0 || t.SlurmEnd < 0:
		return t, fmt.Errorf("%w: negative count", ErrBadTag)
	}
	if _, _, err := net.SplitHostPort(t.GRPC); err != nil {
		return t, fmt.Errorf("%w: grpc address %q: %w", ErrBadTag, t.GRPC, err)
	}
	if t.Replica != "" {
		if _, _, err := net.SplitHostPort(t.Replica); err != nil {
			return t, fmt.Errorf("%w: replica address %q: %w", ErrBadTag, t.Replica, err)
		}
	}
	if t.SlurmJob != "" {
		if _, err := strconv.ParseUint(t.SlurmJob, 10, 64); err != nil {
			return t, fmt.Errorf("%w: slurm job %q is not a job id", ErrBadTag, t.SlurmJob)
		}
		t.PortBand = slurm.PortBand(t.SlurmJob)
	}
	return t, nil
}

// IP is the host part of the agent's gRPC address: the node IP engines use.
func (t Tag) IP() string {
	h, _, _ := net.SplitHostPort(t.GRPC)
	return h
}
