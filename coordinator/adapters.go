package coordinator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoalhq/shoal/coordinator/adapterplan"
	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/coordinator/store"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/spec"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// LoRA adapters (docs/design/adapters.md §A4): every second the leader
// decides, per deployment with engine.lora, which replica holds which
// adapter (adapterplan.Place) and tells each head what changed
// (SetAdapters); the heads load, and report in their Replica streams.

// adapterInterval is how often placements are decided.
const adapterInterval = time.Second

// adapterResend is how long a head whose report disagrees with what it
// was told waits before it is told again.
const adapterResend = 5 * time.Second

// adapterBook is the adapter loop's memory.
type adapterBook struct {
	mu         sync.Mutex
	pins       map[string][]string  // guarded by mu; group → pins last decided
	remembered map[string][]string  // guarded by mu; group → what it held when it last served
	sent       map[string]sentState // guarded by mu; group → the last SetAdapters it acknowledged
	changes    sync.Mutex           // one ChangeAdapters at a time
	replicas   *prometheus.GaugeVec
}

type sentState struct {
	key string // epoch/term/node of the head told
	req *agentv1.SetAdaptersRequest
	at  time.Time
}

func newAdapterBook(reg *prometheus.Registry) *adapterBook {
	b := &adapterBook{pins: map[string][]string{}, remembered: map[string][]string{}, sent: map[string]sentState{},
		replicas: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_adapter_replicas",
			Help: "Replicas whose engine holds the adapter (loaded), by deployment and adapter."}, []string{"deployment", "adapter"})}
	reg.MustRegister(b.replicas)
	return b
}

func (c *Coordinator) adapterLoop(ctx context.Context) {
	t := time.NewTicker(adapterInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if c.leading() {
			c.adapterPass()
		}
	}
}

// held are the adapters a report says the engine has or is getting;
// settled: none is pending, downloading or loading.
func held(m *replicav1.Metrics) (loaded, all []string, settled bool) {
	settled = true
	for _, a := range m.GetAdapters() {
		switch a.State {
		case "loaded":
			loaded = append(loaded, a.Name)
			all = append(all, a.Name)
		case "loading", "downloading":
			all = append(all, a.Name)
			settled = false
		case "pending":
			settled = false
		}
	}
	return loaded, all, settled
}

// adapterPass decides and tells. Leader only.
func (c *Coordinator) adapterPass() {
	recs, err := c.deployments()
	if err != nil {
		return
	}
	groups, err := c.store.Groups()
	if err != nil {
		return
	}
	views := c.heads.Views()
	b := c.adapters
	live := map[string]bool{}
	for _, rec := range recs {
		d := rec.Spec
		if d == nil || d.Engine.LoRA == nil {
			continue
		}
		var reps []adapterplan.Replica
		var gs []*store.Group
		count := map[string]int{} // adapter → replicas whose engine holds it
		for _, g := range groups {
			if g.Deployment != d.Name || g.Draining() {
				continue
			}
			live[g.ID] = true
			r := adapterplan.Replica{Group: g.ID, Slots: d.Slots()}
			if v, ok := views[g.ID]; ok && v.Metrics != nil && v.Key.Epoch == g.Epoch {
				r.Serving = v.Connected && v.Metrics.Serving
				loaded, all, settled := held(v.Metrics)
				r.Held = all
				if v.Connected {
					for _, n := range loaded {
						count[n]++
					}
				}
				// What it holds is remembered once its head was told and has
				// done what it was told (a head that just came up holds
				// nothing yet: remembering that would forget what the group
				// held before its re-form).
				b.mu.Lock()
				if last, ok := b.sent[g.ID]; r.Serving && settled && ok && last.key == headKey(v) {
					b.remembered[g.ID] = loaded
				}
				b.mu.Unlock()
			}
			reps = append(reps, r)
			gs = append(gs, g)
		}
		ads := make([]adapterplan.Adapter, 0, len(d.Adapters))
		for _, a := range d.Adapters {
			ads = append(ads, adapterplan.Adapter{Name: a.Name, MaxReplicas: a.MaxReplicas})
		}
		b.mu.Lock()
		out := adapterplan.Place(adapterplan.Input{Adapters: ads, Replicas: reps, Pins: b.pins, Remembered: b.remembered})
		for g, ps := range out.Pins {
			b.pins[g] = ps
		}
		b.mu.Unlock()
		if len(out.Unplaced) > 0 {
			c.events.add(d.Name, "adapters/unplaced", "%d adapter(s) have no replica with a free slot to hold them (%s…): they are loaded on demand, "+
				"evicting the least recently used; raise engine.lora.maxCpuLoras or add replicas", len(out.Unplaced), out.Unplaced[0])
		}
		catalog := make([]*agentv1.AdapterSpec, 0, len(d.Adapters))
		for _, a := range d.Adapters {
			catalog = append(catalog, &agentv1.AdapterSpec{Name: a.Name, Source: a.Source, Rank: int32(a.Rank), MaxReplicas: int32(a.MaxReplicas)})
		}
		for _, g := range gs {
			v, ok := views[g.ID]
			if !ok || !v.Connected || v.Metrics == nil || v.Key.Epoch != g.Epoch {
				continue
			}
			req := &agentv1.SetAdaptersRequest{GroupId: g.ID, Epoch: g.Epoch, Catalog: catalog, Pinned: out.Pins[g.ID], Warm: out.Warm[g.ID], Drop: out.Drop[g.ID]}
			c.tellAdapters(d.Name, g, v, req)
		}
		for _, a := range d.Adapters {
			b.replicas.WithLabelValues(d.Name, a.Name).Set(float64(count[a.Name]))
		}
	}
	b.mu.Lock()
	for g := range b.pins {
		if !live[g] {
			delete(b.pins, g)
			delete(b.remembered, g)
			delete(b.sent, g)
		}
	}
	b.mu.Unlock()
}

// agrees: the head's report shows req's catalog and pins.
func agrees(m *replicav1.Metrics, req *agentv1.SetAdaptersRequest) bool {
	if len(m.Adapters) != len(req.Catalog) {
		return false
	}
	for _, a := range m.Adapters {
		if a.Pinned != slices.Contains(req.Pinned, a.Name) {
			return false
		}
	}
	return true
}

// tellAdapters sends req to the group's head when it differs from what the
// head last acknowledged, or the head's report does not show it.
func (c *Coordinator) tellAdapters(dep string, g *store.Group, v router.ReplicaView, req *agentv1.SetAdaptersRequest) {
	key := headKey(v)
	b := c.adapters
	b.mu.Lock()
	last, ok := b.sent[g.ID]
	b.mu.Unlock()
	now := time.Now()
	same := ok && last.key == key && proto.Equal(last.req, req)
	if same && (agrees(v.Metrics, req) || now.Sub(last.at) < adapterResend) {
		return
	}
	addr := ""
	for _, m := range g.Members {
		if m.NodeID == v.Key.Node {
			addr = m.GRPC
		}
	}
	if addr == "" {
		return
	}
	req.CoordinatorTerm = c.fenceTerm()
	c.calls.call(v.Key.Node, addr, "set-adapters", func(ctx context.Context, cl agentv1.AgentClient) error {
		_, err := cl.SetAdapters(ctx, req)
		if err == nil {
			b.mu.Lock()
			b.sent[g.ID] = sentState{key: key, req: req, at: time.Now()}
			b.mu.Unlock()
		}
		return err
	}, func(err error) {
		c.events.add(dep, "adapters/"+g.ID, "telling %s's head %s its adapters failed: %v", g.ID, v.Key.Node, err)
	})
}

// adapterInfos is the deployment's adapters with their state on every
// replica, from the heads' reports.
func (c *Coordinator) adapterInfos(d *spec.Deployment, groups []*store.Group) []*coordv1.AdapterInfo {
	if len(d.Adapters) == 0 {
		return nil
	}
	views := c.heads.Views()
	type rep struct {
		g    string
		head string
		st   map[string]*replicav1.AdapterState
	}
	var reps []rep
	for _, g := range groups {
		if g.Deployment != d.Name {
			continue
		}
		r := rep{g: g.ID, st: map[string]*replicav1.AdapterState{}}
		if v, ok := views[g.ID]; ok && v.Metrics != nil && v.Key.Epoch == g.Epoch {
			r.head = v.Key.Node
			for _, a := range v.Metrics.Adapters {
				r.st[a.Name] = a
			}
		}
		reps = append(reps, r)
	}
	sort.Slice(reps, func(i, j int) bool { return reps[i].g < reps[j].g })
	out := make([]*coordv1.AdapterInfo, 0, len(d.Adapters))
	for _, a := range d.Adapters {
		ai := &coordv1.AdapterInfo{Name: a.Name, Source: a.Source, Rank: int32(a.Rank), MaxReplicas: int32(a.MaxReplicas)}
		for _, r := range reps {
			st := r.st[a.Name]
			if st == nil || (st.State == "" && !st.Pinned) {
				continue
			}
			ai.Replicas = append(ai.Replicas, &coordv1.AdapterReplica{GroupId: r.g, HeadNodeId: r.head, State: st.State, Reason: st.Reason,
				Pinned: st.Pinned, LoadSeconds: st.LoadSeconds})
		}
		out = append(out, ai)
	}
	return out
}

// checkAdapterNames refuses adapter names another deployment serves (its
// name, its served model name, one of its adapters), and a served model
// name that is another deployment's adapter: a request's model must name
// one thing.
func (s *apiServer) checkAdapterNames(d *spec.Deployment) error {
	recs, err := s.c.deployments()
	if err != nil {
		return nil
	}
	for _, r := range recs {
		o := r.Spec
		if o == nil || o.Name == d.Name || (d.Roles != nil && strings.HasPrefix(o.Name, d.Name+"-")) {
			continue
		}
		for i, a := range d.Adapters {
			switch {
			case a.Name == o.Name:
				return fmt.Errorf("%w: adapters[%d].name: %q is the name of deployment %s; choose another name", spec.ErrInvalid, i, a.Name, o.Name)
			case a.Name == o.Engine.ServedModelName:
				return fmt.Errorf("%w: adapters[%d].name: %q is the served model name of deployment %s; choose another name", spec.ErrInvalid, i, a.Name, o.Name)
			}
			if _, ok := o.Adapter(a.Name); ok {
				return fmt.Errorf("%w: adapters[%d].name: %q is already an adapter of deployment %s; choose another name", spec.ErrInvalid, i, a.Name, o.Name)
			}
		}
		if _, ok := o.Adapter(d.Engine.ServedModelName); ok {
			return fmt.Errorf("%w: engine.servedModelName: %q is an adapter of deployment %s", spec.ErrInvalid, d.Engine.ServedModelName, o.Name)
		}
		if _, ok := o.Adapter(d.Name); ok {
			return fmt.Errorf("%w: name: %q is an adapter of deployment %s", spec.ErrInvalid, d.Name, o.Name)
		}
	}
	return nil
}

// ChangeAdapters adds and removes adapters: the deployment's spec is
// stored with its adapters changed (nothing is rolled over).
func (s *apiServer) ChangeAdapters(_ context.Context, req *coordv1.ChangeAdaptersRequest) (*coordv1.ChangeAdaptersResponse, error) {
	b := s.c.adapters
	b.changes.Lock()
	defer b.changes.Unlock()
	rec, err := s.c.store.Deployment(req.GetDeployment())
	if errors.Is(err, store.ErrNotFound) {
		if ri, ok := s.c.roleOf(req.GetDeployment()); ok {
			return nil, status.Errorf(codes.FailedPrecondition, "%s is the %s role of deployment %s: LoRA adapters on a deployment with roles are not supported yet",
				req.GetDeployment(), ri.role, ri.parent)
		}
		return nil, status.Errorf(codes.NotFound, "deployment %q not found (`shoal get deployments`)", req.GetDeployment())
	}
	if err != nil {
		return nil, s.c.storeError(err)
	}
	d, err := spec.FromJSON(rec.Spec.JSON())
	if err != nil {
		return nil, status.Errorf(codes.Internal, "stored spec: %v", err)
	}
	if d.Roles != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "deployment %s has roles: LoRA adapters on a deployment with roles are not supported yet", d.Name)
	}
	if d.Engine.LoRA == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "deployment %s runs without engine.lora, so its engines cannot load adapters: "+
			"add `engine: {lora: {maxLoras: 4, maxLoraRank: 16}}` to its spec and apply it (its replicas roll over), then add adapters", d.Name)
	}
	ads := slices.Clone(d.Adapters)
	for _, n := range req.GetRemove() {
		i := slices.IndexFunc(ads, func(a spec.Adapter) bool { return a.Name == n })
		if i < 0 {
			return nil, status.Errorf(codes.NotFound, "deployment %s has no adapter %q (`shoal adapter list %s`)", d.Name, n, d.Name)
		}
		ads = slices.Delete(ads, i, i+1)
	}
	var added []string
	for _, a := range req.GetAdd() {
		if old, ok := d.Adapter(a.Name); ok && !slices.Contains(req.GetRemove(), a.Name) {
			return nil, status.Errorf(codes.AlreadyExists, "deployment %s already has an adapter %q (source %s): remove it first, or choose another name",
				d.Name, a.Name, old.Source)
		}
		ads = append(ads, spec.Adapter{Name: a.Name, Source: a.Source, Rank: int(a.Rank), MaxReplicas: int(a.MaxReplicas)})
		added = append(added, a.Name)
	}
	d.Adapters = ads
	if err := d.Validate(); err != nil {
		return nil, apiError(err)
	}
	if err := s.checkAdapterNames(d); err != nil {
		return nil, apiError(err)
	}
	y, err := spec.WithAdapters([]byte(rec.SpecYAML), ads)
	if err != nil {
		return nil, apiError(err)
	}
	if _, err := s.c.store.PutDeployment(d, string(y)); err != nil {
		return nil, s.c.storeError(err)
	}
	if len(added) > 0 {
		s.c.events.add(d.Name, "", "adapter(s) added: %s", strings.Join(added, ", "))
	}
	if len(req.GetRemove()) > 0 {
		s.c.events.add(d.Name, "", "adapter(s) removed: %s", strings.Join(req.GetRemove(), ", "))
	}
	var warnings []string
	if n, slots := len(ads), d.Slots()*d.DesiredReplicas(); n > slots {
		warnings = append(warnings, fmt.Sprintf("%d adapters and %d slots (%d replica(s) × engine.lora.maxCpuLoras %d): %d are loaded on demand, evicting the least recently used",
			n, slots, d.DesiredReplicas(), d.Slots(), n-slots))
	}
	s.c.poke()
	return &coordv1.ChangeAdaptersResponse{Adapters: int32(len(ads)), Warnings: warnings}, nil
}

// ListAdapters lists a deployment's adapters and where they are held.
func (s *apiServer) ListAdapters(_ context.Context, req *coordv1.ListAdaptersRequest) (*coordv1.ListAdaptersResponse, error) {
	rec, err := s.c.store.Deployment(req.GetDeployment())
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, status.Errorf(codes.NotFound, "deployment %q not found (`shoal get deployments`)", req.GetDeployment())
		}
		return nil, s.c.storeError(err)
	}
	groups, err := s.c.store.Groups()
	if err != nil {
		return nil, apiError(err)
	}
	n := 0
	for _, g := range groups {
		if g.Deployment == rec.Name {
			n++
		}
	}
	return &coordv1.ListAdaptersResponse{Adapters: s.c.adapterInfos(rec.Spec, groups), Slots: int32(rec.Spec.Slots()), Replicas: int32(n)}, nil
}

// headKey names the head claim a SetAdapters went to.
func headKey(v router.ReplicaView) string {
	return fmt.Sprintf("%d/%d/%s", v.Key.Epoch, v.Key.Term, v.Key.Node)
}
