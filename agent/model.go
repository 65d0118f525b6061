package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shoalhq/shoal/model"
	"github.com/shoalhq/shoal/spec"
)

// modelJob is where the engine reads weights on this host and whether the
// agent pulls them there first.
type modelJob struct {
	uri      model.URI
	dir      string
	remote   bool
	suffixes []string
}

// modelFor resolves a deployment's weights on this host: a remote source
// goes to model.path if set, else <models_dir>/<name>; a local source is used
// in place, at model.path when the spec gives one (the path the weights have
// on the hosts, as docs/reference.md says; it defaults to the source).
func (a *Agent) modelFor(d *spec.Deployment) (*modelJob, error) {
	if d.Model.Source == "" {
		return nil, nil // a command engine without weights to manage
	}
	u, err := model.ParseURI(d.Model.Source)
	if err != nil {
		return nil, err
	}
	j := &modelJob{uri: u, suffixes: d.Model.Suffixes}
	switch {
	case u.Scheme == model.SchemeLocal && d.Model.Path != "":
		j.dir = d.Model.Path
	case u.Scheme == model.SchemeLocal:
		j.dir = u.Path
	case d.Model.Path != "":
		j.dir, j.remote = d.Model.Path, true
	default:
		j.dir, j.remote = filepath.Join(a.cfg.ModelsDir, u.Name()), true
	}
	return j, nil
}

// hasWeights says whether this host already holds the assignment's model,
// which the election prefers for the head.
func (a *Agent) hasWeights(d *spec.Deployment) bool {
	j, err := a.modelFor(d)
	if err != nil || j == nil {
		return false
	}
	if !j.remote {
		return model.Check(j.dir) == nil
	}
	return model.Complete(j.dir, j.uri.String())
}

type downloadMetrics struct {
	bytes *prometheus.GaugeVec
	files *prometheus.GaugeVec
	rate  *prometheus.GaugeVec
	pulls *prometheus.CounterVec
}

func newDownloadMetrics(reg *prometheus.Registry) *downloadMetrics {
	m := &downloadMetrics{
		bytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_model_download_bytes",
			Help: "Bytes of the current or last weight pull, by kind (done, total)."}, []string{"model", "kind"}),
		files: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_model_download_files",
			Help: "Files of the current or last weight pull, by kind (done, total)."}, []string{"model", "kind"}),
		rate: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shoal_model_download_rate_bytes_per_second",
			Help: "Transfer rate of the current weight pull over the last seconds."}, []string{"model"}),
		pulls: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shoal_model_pulls_total",
			Help: "Weight pulls by result (complete, failed)."}, []string{"model", "result"}),
	}
	reg.MustRegister(m.bytes, m.files, m.rate, m.pulls)
	return m
}

// weightsFunc is a run's Weights: it pulls (or checks) the model before any
// engine process starts, so an incomplete model is never handed to an
// engine. It runs on the runner's goroutine; its error is the run's failure.
func (a *Agent) weightsFunc(j *modelJob, timeout time.Duration) func(ctx context.Context, progress func(string)) error {
	return func(ctx context.Context, progress func(string)) error {
		if !j.remote {
			if a.cfg.SkipLocalModelCheck {
				return nil
			}
			if err := model.Check(j.dir); err != nil {
				return fmt.Errorf("model: %w", err)
			}
			return nil
		}
		d := a.cfg.Download
		src, err := model.Open(ctx, j.uri, model.Config{S3Endpoint: d.S3Endpoint, S3PathStyle: d.S3PathStyle,
			HFEndpoint: d.HFEndpoint, GCSEndpoint: d.GCSEndpoint, Workers: d.Workers})
		if err != nil {
			return fmt.Errorf("model: %w", err)
		}
		pctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		name := j.uri.Name()
		var last model.Progress
		var lastPub time.Time
		opt := model.Options{Dir: j.dir, Filter: model.Filter{Suffixes: j.suffixes}, Workers: d.Workers,
			ChunkSize: int64(d.PartSizeMiB) << 20, Log: a.log, RateLimit: int64(d.LimitMiBps) << 20,
			OnProgress: func(p model.Progress) {
				last = p
				a.dl.bytes.WithLabelValues(name, "done").Set(float64(p.BytesDone))
				a.dl.bytes.WithLabelValues(name, "total").Set(float64(p.Bytes))
				a.dl.files.WithLabelValues(name, "done").Set(float64(p.FilesDone))
				a.dl.files.WithLabelValues(name, "total").Set(float64(p.Files))
				a.dl.rate.WithLabelValues(name).Set(p.Rate)
				if time.Since(lastPub) >= 2*time.Second { // gossip carries it; do not flood
					lastPub = time.Now()
					progress(fmt.Sprintf("%.0f%% %s/s", 100*p.Fraction(), model.Human(int64(p.Rate))))
				}
			}}
		_, err = model.Pull(pctx, src, opt)
		a.dl.rate.WithLabelValues(name).Set(0)
		if err != nil {
			a.dl.pulls.WithLabelValues(name, "failed").Inc()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pctx.Err() != nil {
				return fmt.Errorf("model pull: not finished within engine.startupTimeoutSeconds (%v): %.0f%% of %s at %s/s; raise the timeout or speed up the source",
					timeout, 100*last.Fraction(), model.Human(last.Bytes), model.Human(int64(last.Rate)))
			}
			return fmt.Errorf("model pull: %w", err)
		}
		a.dl.pulls.WithLabelValues(name, "complete").Inc()
		a.pulled.Store(true)
		return nil
	}
}
