package coordinator

import (
	"encoding/json"
	"net/http"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/shoalhq/shoal/gossip"
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

// clusterMetrics are gauges of the cluster's shape, refreshed by reconcile.
type clusterMetrics struct {
	nodes    *prometheus.GaugeVec
	replicas *prometheus.GaugeVec
	reforms  *prometheus.CounterVec
}

func newClusterMetrics(reg *prometheus.Registry) *clusterMetrics {
	m := &clusterMetrics{
		nodes: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_nodes",
			Help: "Agents in the gossip by state (idle, assigned, unhealthy)."}, []string{"state"}),
		replicas: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_replicas",
			Help: "Replica groups by deployment and state (ready, starting, degraded, draining)."}, []string{"deployment", "state"}),
		reforms: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_replica_reforms_total",
			Help: "Replica groups re-formed on other nodes under a new epoch."}, []string{"deployment"}),
	}
	reg.MustRegister(m.nodes, m.replicas, m.reforms)
	return m
}

// observe refreshes the gauges from the current state.
func (c *Coordinator) observe(nodes map[string]gossip.Tag) {
	counts := map[string]float64{"idle": 0, "assigned": 0, "unhealthy": 0}
	for _, t := range nodes {
		switch {
		case !t.Healthy:
			counts["unhealthy"]++
		case t.Group != "":
			counts["assigned"]++
		default:
			counts["idle"]++
		}
	}
	for s, n := range counts {
		c.cm.nodes.WithLabelValues(s).Set(n)
	}
	if deps, err := c.store.Deployments(); err == nil {
		for _, d := range deps {
			c.cm.reforms.WithLabelValues(d.Name) // a series at 0 from the start, so increase() works
		}
	}
	groups, err := c.store.Groups()
	if err != nil {
		return
	}
	c.cm.replicas.Reset()
	api := &apiServer{c: c}
	for _, ri := range api.replicas("", groups) {
		c.cm.replicas.WithLabelValues(ri.Deployment, ri.State).Inc()
	}
}
