package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoalhq/shoal/agent/adapters"
	"github.com/shoalhq/shoal/agent/runner"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/model"
	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	replicav1 "github.com/shoalhq/shoal/proto/replica/v1"
	"github.com/shoalhq/shoal/spec"
)

// A head's LoRA adapters (docs/design/adapters.md §A3): while its run
// serves, an adapters.Manager loads and unloads them through the engine's
// API; the coordinator's SetAdapters says which the replica holds, a
// router's LoadAdapter asks for one more.

// adapterState is the loop's record of the adapters of its run.
type adapterState struct {
	m   *adapters.Manager
	run *activeRun
	// req is the coordinator's latest SetAdapters for the assignment's
	// (group, epoch); nil before one came.
	req *agentv1.SetAdaptersRequest
}

type adapterMetrics struct {
	loads   *prometheus.CounterVec
	seconds *prometheus.HistogramVec
}

func newAdapterMetrics(reg *prometheus.Registry) *adapterMetrics {
	m := &adapterMetrics{
		loads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_adapter_loads_total",
			Help: "LoRA adapter loads on this head's engine, by adapter and result (loaded, failed)."}, []string{"adapter", "result"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "shoal_adapter_load_seconds",
			Help:    "Time to make an adapter servable here: download and engine load.",
			Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}}, []string{"adapter"}),
	}
	reg.MustRegister(m.loads, m.seconds)
	return m
}

// adaptersWanted: the run (in state st) serves, on the head, with LoRA
// slots. Loop only.
func (a *Agent) adaptersWanted(st runner.Status) bool {
	as := a.loc.As
	if as == nil || as.Spec.Engine.LoRA == nil || a.loc.Claim == 0 || a.run == nil || a.run.plan.Endpoint == "" {
		return false
	}
	return st.Phase == gossip.EngineReady && st.Failed == "" && !st.Stopping
}

// syncAdapters starts the run's manager once it serves, stops it when the
// run ends, and passes the engine's busy adapters on. Loop only.
func (a *Agent) syncAdapters() {
	ad := &a.ad
	if as := a.loc.As; ad.req != nil && (as == nil || as.Group != ad.req.GroupId || as.Epoch != ad.req.Epoch) {
		ad.req = nil // another assignment's
	}
	var st runner.Status
	if a.run != nil {
		st = a.run.r.Status()
	}
	want := a.adaptersWanted(st)
	if ad.m != nil && (!want || ad.run != a.run) {
		a.closeAdapters() // the engine run ended: its adapters with it
	}
	if want && ad.m == nil {
		as, p := a.loc.As, a.run.plan
		key, _ := spec.ArgValue(as.Spec.Engine.Args, "--api-key")
		ad.m = adapters.New(adapters.Config{
			Slots:   as.Spec.Slots(),
			Engine:  &adapters.HTTPEngine{Base: "http://" + p.Endpoint, APIKey: key, Client: &http.Client{}},
			Fetch:   a.fetchAdapter,
			Changed: a.poke,
			Log:     a.log.With("component", "adapters", "group", as.Group),
			OnLoad: func(name string, d time.Duration, err error) {
				result := "loaded"
				if err != nil {
					result = "failed"
				}
				a.adm.loads.WithLabelValues(name, result).Inc()
				if err == nil {
					a.adm.seconds.WithLabelValues(name).Observe(d.Seconds())
				}
			},
		})
		ad.run = a.run
		a.applyAdapters()
	}
	if ad.m != nil && st.Metrics.Have {
		ad.m.Used(st.Metrics.LoRAActive)
	}
}

// applyAdapters hands the manager the coordinator's word, or before it
// came the catalog of the assigned spec. Loop only.
func (a *Agent) applyAdapters() {
	ad := &a.ad
	if ad.m == nil {
		return
	}
	if r := ad.req; r != nil {
		cat := make([]adapters.Spec, 0, len(r.Catalog))
		for _, s := range r.Catalog {
			cat = append(cat, adapters.Spec{Name: s.Name, Source: s.Source, Rank: int(s.Rank), MaxReplicas: int(s.MaxReplicas)})
		}
		ad.m.Set(cat, r.Pinned, r.Warm, r.Drop)
		return
	}
	ad.m.Set(specCatalog(a.loc.As.Spec), nil, nil, nil)
}

func specCatalog(d *spec.Deployment) []adapters.Spec {
	out := make([]adapters.Spec, 0, len(d.Adapters))
	for _, s := range d.Adapters {
		out = append(out, adapters.Spec{Name: s.Name, Source: s.Source, Rank: s.Rank, MaxReplicas: s.MaxReplicas})
	}
	return out
}

// setAdapters takes the coordinator's SetAdapters. Loop only.
func (a *Agent) setAdapters(req *agentv1.SetAdaptersRequest) error {
	as := a.loc.As
	switch {
	case as == nil || as.Group != req.GroupId || as.Epoch != req.Epoch:
		return fmt.Errorf("%w: node is not in group %s at epoch %d", errBusy, req.GroupId, req.Epoch)
	case a.loc.Claim == 0:
		return fmt.Errorf("%w: node is not the head of group %s", errBusy, req.GroupId)
	case as.Spec.Engine.LoRA == nil:
		return fmt.Errorf("%w: group %s's engine runs without engine.lora", errBusy, req.GroupId)
	}
	for _, s := range req.Catalog {
		if errs := spec.CheckAdapter(spec.Adapter{Name: s.Name, Source: s.Source, Rank: int(s.Rank), MaxReplicas: int(s.MaxReplicas)},
			as.Spec.Engine.LoRA.MaxLoraRank); len(errs) > 0 {
			return fmt.Errorf("%w: adapter %q: %v", spec.ErrInvalid, s.Name, errs[0])
		}
	}
	a.ad.req = req
	a.applyAdapters()
	a.poke()
	return nil
}

// adapterReport is the head's report of its adapters. Loop only.
func (a *Agent) adapterReport(m *replicav1.Metrics) {
	as := a.loc.As
	if as == nil || as.Spec.Engine.LoRA == nil {
		return
	}
	m.AdapterSlots = int32(as.Spec.Slots())
	if a.ad.m != nil {
		for _, s := range a.ad.m.States() {
			st := &replicav1.AdapterState{Name: s.Name, State: s.State, Reason: s.Reason, MaxReplicas: int32(s.MaxReplicas), Pinned: s.Pinned,
				LoadSeconds: s.LoadSeconds}
			if !s.LastUsed.IsZero() {
				st.LastUsedUnixMillis = s.LastUsed.UnixMilli()
			}
			m.Adapters = append(m.Adapters, st)
		}
		return
	}
	// Not serving yet: the catalog, nothing held.
	if r := a.ad.req; r != nil {
		for _, s := range r.Catalog {
			m.Adapters = append(m.Adapters, &replicav1.AdapterState{Name: s.Name, MaxReplicas: s.MaxReplicas, Pinned: slices.Contains(r.Pinned, s.Name)})
		}
		return
	}
	for _, s := range as.Spec.Adapters {
		m.Adapters = append(m.Adapters, &replicav1.AdapterState{Name: s.Name, MaxReplicas: int32(s.MaxReplicas)})
	}
}

// fetchAdapter readies an adapter's weights on this host with the model
// downloader: a path is used in place, a remote source pulled once per host
// into MODELS_DIR/adapters/NAME-HASH (verified and resumable as any model).
func (a *Agent) fetchAdapter(ctx context.Context, s adapters.Spec, progress func(string)) (string, error) {
	u, err := model.ParseURI(s.Source)
	if err != nil {
		return "", err
	}
	j := &modelJob{uri: u, dir: u.Path}
	if u.Scheme != model.SchemeLocal {
		j.dir, j.remote = filepath.Join(a.cfg.ModelsDir, "adapters", adapterDir(u)), true
		if model.Complete(j.dir, u.String()) {
			return j.dir, nil
		}
	}
	if !j.remote {
		if _, err := os.Stat(filepath.Join(j.dir, "adapter_config.json")); err != nil {
			return "", fmt.Errorf("adapter %s: no adapter_config.json in %s on this host", s.Name, j.dir)
		}
		return j.dir, nil
	}
	if err := a.weightsFunc(j, 30*time.Minute)(ctx, progress); err != nil {
		return "", fmt.Errorf("adapter %s: %w", s.Name, err)
	}
	if _, err := os.Stat(filepath.Join(j.dir, "adapter_config.json")); err != nil {
		return "", fmt.Errorf("adapter %s: %s holds no adapter_config.json: not a LoRA adapter", s.Name, s.Source)
	}
	return j.dir, nil
}

// adapterLoader is the Replica API's way to the current run's manager.
type adapterLoader interface {
	Load(ctx context.Context, name string) error
}

// adapterDir names an adapter's directory by its source: two deployments
// of one adapter share the copy, two adapters of one name do not.
func adapterDir(u model.URI) string {
	h := sha256.Sum256([]byte(u.String()))
	return u.Name() + "-" + hex.EncodeToString(h[:4])
}

// closeAdapters stops the run's manager; the agent's exit waits for its
// goroutine (a.bg). Loop only.
func (a *Agent) closeAdapters() {
	m := a.ad.m
	if m == nil {
		return
	}
	a.ad.m, a.ad.run = nil, nil
	m.Close()
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		<-m.Done()
	}()
}
