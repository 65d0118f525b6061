package console

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
)

// GPU is one device of a node as its agent's inventory reports it.
type GPU struct {
	Index        int      `json:"index"`
	Name         string   `json:"name"`
	MemoryMiB    uint64   `json:"memoryMiB"`
	Healthy      bool     `json:"healthy"`
	Reasons      []string `json:"reasons,omitempty"`
	TemperatureC int      `json:"temperatureC"`
	ECCVolatile  uint64   `json:"eccVolatileUncorrected"`
}

// inventory is the part of an agent's host inventory (DescribeNode's
// inventory_json, agent.HostInventory) the console shows.
type inventory struct {
	GPU *struct {
		Driver  string `json:"driver_version"`
		Devices []struct {
			Index                  int      `json:"index"`
			Name                   string   `json:"name"`
			MemoryMiB              uint64   `json:"memory_mib"`
			Healthy                bool     `json:"healthy"`
			Reasons                []string `json:"reasons"`
			TemperatureC           int      `json:"temperature_c"`
			ECCVolatileUncorrected uint64   `json:"ecc_volatile_uncorrected"`
		} `json:"devices"`
	} `json:"gpu"`
	Events []struct {
		Index  int    `json:"index"`
		Reason string `json:"reason"`
	} `json:"events"`
}

// Inventory is what the console keeps of a node's inventory.
type Inventory struct {
	Driver string   `json:"driver,omitempty"`
	GPUs   []GPU    `json:"gpus"`
	Events []string `json:"events,omitempty"`
	// Healthy is the node's health (its gossip tag) when it was read: a
	// change makes the console read it again.
	Healthy bool      `json:"-"`
	At      time.Time `json:"at"`
	Err     string    `json:"error,omitempty"`
}

// parseInventory reads an agent's inventory JSON.
func parseInventory(b []byte) (*Inventory, error) {
	var in inventory
	if err := json.Unmarshal(b, &in); err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	if in.GPU == nil {
		return nil, fmt.Errorf("inventory has no GPU section (an older agent?)")
	}
	out := &Inventory{Driver: in.GPU.Driver, GPUs: []GPU{}}
	for _, d := range in.GPU.Devices {
		out.GPUs = append(out.GPUs, GPU{Index: d.Index, Name: d.Name, MemoryMiB: d.MemoryMiB, Healthy: d.Healthy,
			Reasons: d.Reasons, TemperatureC: d.TemperatureC, ECCVolatile: d.ECCVolatileUncorrected})
	}
	for _, e := range in.Events {
		out.Events = append(out.Events, fmt.Sprintf("GPU %d: %s", e.Index, e.Reason))
	}
	return out, nil
}

// inventoryOf is an agent's inventory, or one that says why it could not
// be read.
func inventoryOf(b []byte) *Inventory {
	in, err := parseInventory(b)
	if err != nil {
		return &Inventory{Err: err.Error(), GPUs: []GPU{}}
	}
	return in
}

// Node is one node as the cluster view shows it.
type Node struct {
	ID        string `json:"id"`
	Address   string `json:"address,omitempty"`
	State     string `json:"state"`
	Role      string `json:"role,omitempty"`
	Healthy   bool   `json:"healthy"`
	Engine    string `json:"engine,omitempty"`
	RDMA      string `json:"rdma,omitempty"`
	GPUModel  string `json:"gpuModel,omitempty"`
	GPUCount  int    `json:"gpuCount"`
	GPUMemGiB int    `json:"gpuMemGiB,omitempty"`
	Progress  string `json:"progress,omitempty"`
	SlurmJob  string `json:"slurmJob,omitempty"`
	Leaving   bool   `json:"leaving,omitempty"`
	// Missing: a member of a replica that the gossip does not hold (its
	// agent is gone or unreachable).
	Missing   bool       `json:"missing,omitempty"`
	Inventory *Inventory `json:"inventory,omitempty"`
}

// Load is a replica's load as its head reports it.
type Load struct {
	Running float64 `json:"running"`
	Waiting float64 `json:"waiting"`
	KV      float64 `json:"kvCacheUsage"`
}

// Replica is one replica group.
type Replica struct {
	ID         string `json:"id"`
	Deployment string `json:"deployment"`
	Epoch      uint64 `json:"epoch"`
	State      string `json:"state"`
	Head       string `json:"head,omitempty"`
	Endpoint   string `json:"endpoint,omitempty"`
	Load       Load   `json:"load"`
	Progress   string `json:"progress,omitempty"`
	Outdated   bool   `json:"outdated,omitempty"`
	SlurmJob   string `json:"slurmJob,omitempty"`
	// SlurmReason is why a queued job waits.
	SlurmReason string `json:"slurmReason,omitempty"`
	Members     []Node `json:"members"`
}

// ClusterView is GET /api/cluster.
type ClusterView struct {
	Nodes         int       `json:"nodes"`
	HealthyNodes  int       `json:"healthyNodes"`
	GPUs          int       `json:"gpus"`
	Replicas      []Replica `json:"replicas"`
	Free          []Node    `json:"free"`
	Deployments   []string  `json:"deployments"`
	Filter        Filter    `json:"filter"`
	UnhealthyGPUs int       `json:"unhealthyGpus"`
}

// Filter narrows the cluster view.
type Filter struct {
	Deployment string `json:"deployment,omitempty"`
	// Health is "", "healthy" or "unhealthy".
	Health string `json:"health,omitempty"`
}

// checkFilter refuses a health filter it does not know.
func checkFilter(f Filter) error {
	switch f.Health {
	case "", "healthy", "unhealthy":
		return nil
	}
	return fmt.Errorf("health=%q: give healthy or unhealthy", f.Health)
}

func nodeOf(n *coordv1.NodeInfo, inv *Inventory) Node {
	return Node{ID: n.NodeId, Address: n.Address, State: n.State, Role: n.Role, Healthy: n.Healthy, Engine: n.EngineState,
		RDMA: n.Rdma, GPUModel: n.GpuModel, GPUCount: int(n.GpuCount), GPUMemGiB: int(n.GpuMemoryGib), Progress: n.Progress,
		SlurmJob: n.SlurmJob, Leaving: n.Leaving, Inventory: inv}
}

func byNodeID(nodes []*coordv1.NodeInfo) map[string]*coordv1.NodeInfo {
	m := make(map[string]*coordv1.NodeInfo, len(nodes))
	for _, n := range nodes {
		m[n.NodeId] = n
	}
	return m
}

func (n Node) matches(health string) bool {
	switch health {
	case "healthy":
		return n.Healthy && !n.Missing
	case "unhealthy":
		return !n.Healthy || n.Missing
	}
	return true
}

func replicaOf(r *coordv1.ReplicaInfo) Replica {
	return Replica{ID: r.GroupId, Deployment: r.Deployment, Epoch: r.Epoch, State: r.State, Head: r.Head, Endpoint: r.Endpoint,
		Load: Load{Running: r.NumRequestsRunning, Waiting: r.NumRequestsWaiting, KV: r.KvCacheUsage}, Progress: r.Progress,
		Outdated: r.Outdated, SlurmJob: r.SlurmJob, SlurmReason: r.SlurmReason, Members: []Node{}}
}

// buildCluster groups the nodes by replica, head first, members the gossip
// lost marked missing; nodes in no replica are free. Pure: the API's
// answers and the inventories read so far in, the view out.
func buildCluster(nodes []*coordv1.NodeInfo, reps []*coordv1.ReplicaInfo, inv map[string]*Inventory, f Filter) ClusterView {
	v := ClusterView{Replicas: []Replica{}, Free: []Node{}, Deployments: []string{}, Filter: f}
	byID := byNodeID(nodes)
	for _, n := range nodes {
		v.Nodes++
		if n.Healthy {
			v.HealthyNodes++
		}
		v.GPUs += int(n.GpuCount)
		if in := inv[n.NodeId]; in != nil {
			for _, g := range in.GPUs {
				if !g.Healthy {
					v.UnhealthyGPUs++
				}
			}
		}
	}
	deps := map[string]bool{}
	placed := map[string]bool{}
	for _, r := range reps {
		deps[r.Deployment] = true
		for _, m := range r.Members {
			placed[m] = true
		}
		if f.Deployment != "" && r.Deployment != f.Deployment {
			continue
		}
		rv := replicaOf(r)
		members := append([]string(nil), r.Members...)
		sort.SliceStable(members, func(i, j int) bool { return members[i] == r.Head && members[j] != r.Head })
		for _, m := range members {
			var n Node
			if ni, ok := byID[m]; ok {
				n = nodeOf(ni, inv[m])
			} else {
				n = Node{ID: m, State: "missing", Missing: true}
			}
			if m == r.Head {
				n.Role = "head"
			}
			if n.matches(f.Health) {
				rv.Members = append(rv.Members, n)
			}
		}
		if f.Health != "" && len(rv.Members) == 0 {
			continue
		}
		v.Replicas = append(v.Replicas, rv)
	}
	if f.Deployment == "" {
		for _, n := range nodes {
			if nv := nodeOf(n, inv[n.NodeId]); !placed[n.NodeId] && nv.matches(f.Health) {
				v.Free = append(v.Free, nv)
			}
		}
	}
	for d := range deps {
		v.Deployments = append(v.Deployments, d)
	}
	sort.Strings(v.Deployments)
	sort.SliceStable(v.Replicas, func(i, j int) bool {
		a, b := v.Replicas[i], v.Replicas[j]
		if a.Deployment != b.Deployment {
			return a.Deployment < b.Deployment
		}
		return a.ID < b.ID
	})
	return v
}

// progressSample is a node's weight-pull percentage at a time.
type progressSample struct {
	At  time.Time
	Pct float64
}

// parseProgress reads a progress string ("43% 12.1 GB/s").
func parseProgress(s string) (pct float64, rate string, ok bool) {
	p, r, _ := strings.Cut(strings.TrimSpace(s), " ")
	p, isPct := strings.CutSuffix(p, "%")
	if !isPct {
		return 0, "", false
	}
	if _, err := fmt.Sscanf(p, "%g", &pct); err != nil || math.IsNaN(pct) || pct < 0 || pct > 100 {
		return 0, "", false
	}
	return pct, strings.TrimSpace(r), true
}

// eta estimates the seconds left of a pull from its samples (oldest
// first): the rate of the percentage between the first and the last. It is
// false until the pull moved.
func eta(samples []progressSample) (float64, bool) {
	if len(samples) < 2 {
		return 0, false
	}
	a, b := samples[0], samples[len(samples)-1]
	dt := b.At.Sub(a.At).Seconds()
	dp := b.Pct - a.Pct
	if dt <= 0 || dp <= 0 {
		return 0, false
	}
	return (100 - b.Pct) / (dp / dt), true
}

// Download is one node's weight pull.
type Download struct {
	Replica string  `json:"replica"`
	Node    string  `json:"node"`
	Percent float64 `json:"percent"`
	Rate    string  `json:"rate"`
	// ETASeconds is -1 while no estimate exists.
	ETASeconds float64 `json:"etaSeconds"`
}

// Deployment is GET /api/deployments/{name}.
type Deployment struct {
	Name       string     `json:"name"`
	Model      string     `json:"model"`
	Engine     string     `json:"engine"`
	Nodes      int        `json:"nodesPerReplica"`
	Desired    int        `json:"desiredReplicas"`
	Ready      int        `json:"readyReplicas"`
	Created    int64      `json:"createdUnix"`
	Replicas   []Replica  `json:"replicas"`
	Autoscaler string     `json:"autoscaler,omitempty"`
	Hold       string     `json:"hold,omitempty"`
	Events     []string   `json:"events"`
	Downloads  []Download `json:"downloads"`
	Adapters   []string   `json:"adapters"`
	Settings   string     `json:"engineSettings,omitempty"`
	Spec       string     `json:"spec"`
}

// buildDeployment is a deployment's view from DescribeDeployment, the
// nodes (for their pulls) and the pulls' samples. Pure.
func buildDeployment(d *coordv1.DescribeDeploymentResponse, nodes []*coordv1.NodeInfo, pulls map[string][]progressSample) Deployment {
	s := d.GetSummary()
	v := Deployment{Name: s.GetName(), Model: s.GetModel(), Engine: s.GetEngine(), Nodes: int(s.GetNodesPerReplica()),
		Desired: int(s.GetDesiredReplicas()), Ready: int(s.GetReadyReplicas()), Created: s.GetCreatedUnix(),
		Replicas: []Replica{}, Autoscaler: d.Autoscaler, Hold: d.Hold, Events: append([]string{}, d.Events...),
		Downloads: []Download{}, Adapters: []string{}, Settings: d.EngineSettings, Spec: d.SpecYaml}
	byID := byNodeID(nodes)
	for _, r := range d.Replicas {
		rv := replicaOf(r)
		for _, m := range r.Members {
			n, ok := byID[m]
			if !ok {
				rv.Members = append(rv.Members, Node{ID: m, State: "missing", Missing: true})
				continue
			}
			rv.Members = append(rv.Members, nodeOf(n, nil))
			pct, rate, ok := parseProgress(n.Progress)
			if !ok || n.GroupId != r.GroupId {
				continue
			}
			dl := Download{Replica: r.GroupId, Node: m, Percent: pct, Rate: rate, ETASeconds: -1}
			if e, ok := eta(pulls[m]); ok {
				dl.ETASeconds = math.Round(e)
			}
			v.Downloads = append(v.Downloads, dl)
		}
		v.Replicas = append(v.Replicas, rv)
	}
	for _, a := range d.Adapters {
		held := 0
		for _, r := range a.Replicas {
			if r.State == "loaded" {
				held++
			}
		}
		v.Adapters = append(v.Adapters, fmt.Sprintf("%s (rank %d, loaded on %d)", a.Name, a.Rank, held))
	}
	return v
}
