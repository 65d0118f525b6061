package coordinator

import (
	"encoding/json"
	"net/http"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// The Kubernetes ServiceMonitor, without Kubernetes: Prometheus HTTP service
// discovery (http_sd_configs) of the engines to scrape (current heads only:
// workers serve no metrics, and a superseded head is never listed) and of the
// agents. Served with shoal's own /metrics on the coordinator's metrics port,
// never on the public router port.

type sdGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

func (c *Coordinator) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(c.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/v1/sd/engines", func(w http.ResponseWriter, r *http.Request) { writeSD(w, c.sdEngines()) })
	mux.HandleFunc("/v1/sd/agents", func(w http.ResponseWriter, r *http.Request) { writeSD(w, c.sdAgents()) })
	return mux
}

func writeSD(w http.ResponseWriter, gs []sdGroup) {
	if gs == nil {
		gs = []sdGroup{}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(gs)
}

// sdEngines lists the engine endpoint of each stored group's current head.
func (c *Coordinator) sdEngines() []sdGroup {
	groups, err := c.store.Groups()
	if err != nil {
		return nil
	}
	views := c.heads.Views()
	var out []sdGroup
	for _, g := range groups {
		v, ok := views[g.ID]
		if !ok || v.Key.Epoch != g.Epoch || v.Metrics == nil || v.Metrics.Endpoint == "" {
			continue
		}
		out = append(out, sdGroup{Targets: []string{v.Metrics.Endpoint}, Labels: map[string]string{
			"deployment": g.Deployment, "replica": g.ID, "node": v.Key.Node, "role": "head"}})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Labels["replica"] < out[j].Labels["replica"] })
	return out
}

// sdAgents lists every agent that advertises a metrics address.
func (c *Coordinator) sdAgents() []sdGroup {
	var out []sdGroup
	for id, t := range c.agents() {
		if t.Metrics == "" {
			continue
		}
		out = append(out, sdGroup{Targets: []string{t.Metrics}, Labels: map[string]string{"node": id}})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Labels["node"] < out[j].Labels["node"] })
	return out
}

// clusterMetrics describe the cluster's shape. The gauges are computed when
// Prometheus scrapes (a Collector), not on every reconcile pass: reconcile
// runs on every gossip change, a scrape every 15 s.
type clusterMetrics struct {
	c        *Coordinator
	nodes    *prometheus.Desc
	replicas *prometheus.Desc
	reforms  *prometheus.CounterVec
	// holding is 1 while the isolation guard holds re-forms and scaling.
	holding prometheus.Gauge
}

func newClusterMetrics(c *Coordinator, reg *prometheus.Registry) *clusterMetrics {
	m := &clusterMetrics{c: c,
		nodes: prometheus.NewDesc("shoal_nodes",
			"Agents in the gossip by state (idle, assigned, unhealthy).", []string{"state"}, nil),
		replicas: prometheus.NewDesc("shoal_replicas",
			"Replica groups by deployment and state (ready, starting, downloading, degraded, draining).", []string{"deployment", "state"}, nil),
		reforms: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_replica_reforms_total",
			Help: "Replica groups re-formed on other nodes under a new epoch."}, []string{"deployment"}),
		holding: prometheus.NewGauge(prometheus.GaugeOpts{Name: "shoal_coordinator_isolation_hold",
			Help: "1 while the coordinator holds re-forms and scaling because it lost sight of a large share of the agents at once."}),
	}
	reg.MustRegister(m, m.holding)
	return m
}

func (m *clusterMetrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.nodes
	ch <- m.replicas
	m.reforms.Describe(ch)
}

func (m *clusterMetrics) Collect(ch chan<- prometheus.Metric) {
	counts := map[string]float64{"idle": 0, "assigned": 0, "unhealthy": 0}
	if m.c.mem != nil {
		for _, t := range m.c.agents() {
			switch {
			case !t.Healthy:
				counts["unhealthy"]++
			case t.Group != "":
				counts["assigned"]++
			default:
				counts["idle"]++
			}
		}
	}
	for s, n := range counts {
		ch <- prometheus.MustNewConstMetric(m.nodes, prometheus.GaugeValue, n, s)
	}
	if deps, err := m.c.deployments(); err == nil {
		for _, d := range deps {
			m.reforms.WithLabelValues(d.Name) // a series at 0 from the start, so increase() works
		}
	}
	m.reforms.Collect(ch)
	groups, err := m.c.store.Groups()
	if err != nil || m.c.mem == nil {
		return
	}
	byState := map[[2]string]float64{}
	for _, ri := range m.c.replicaInfos("", groups) {
		byState[[2]string{ri.Deployment, ri.State}]++
	}
	for k, n := range byState {
		ch <- prometheus.MustNewConstMetric(m.replicas, prometheus.GaugeValue, n, k[0], k[1])
	}
}
