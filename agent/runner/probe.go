package runner

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/shoalhq/shoal/engine"
)

// Prober reaches a head's engine over its OpenAI HTTP server.
type Prober interface {
	// Ready: /health answers 200, /v1/models lists the served name, and one
	// canary request succeeds.
	Ready(ctx context.Context) error
	// Canary sends one minimal request to the endpoint the model serves: the
	// only check that runs a step of the engine.
	Canary(ctx context.Context) error
	// Scrape checks /health and reads /metrics.
	Scrape(ctx context.Context) (engine.Metrics, error)
}

// HTTPProber is the Prober of a real (or simulated) engine.
type HTTPProber struct {
	// Base is http://host:port.
	Base string
	// Served is the served model name.
	Served string
	// Canary is the API path the canary uses (engine.Plan.Canary):
	// /v1/completions, /v1/chat/completions, /v1/embeddings, or "" for none.
	CanaryPath string
	// CanaryFields are added to the canary's body (engine.Plan.CanaryFields).
	CanaryFields map[string]any
	Client       *http.Client
}

var probeClient = &http.Client{Timeout: 5 * time.Second}

func (p HTTPProber) client() *http.Client {
	if p.Client != nil {
		return p.Client
	}
	return probeClient
}

// Ready implements Prober.
func (p HTTPProber) Ready(ctx context.Context) error {
	if err := p.get(ctx, "/health", nil); err != nil {
		return err
	}
	var models struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := p.get(ctx, "/v1/models", &models); err != nil {
		return err
	}
	found := false
	for _, m := range models.Data {
		found = found || m.ID == p.Served
	}
	if !found {
		return fmt.Errorf("/v1/models does not list %q", p.Served)
	}
	return p.Canary(ctx)
}

// canaryBody is the smallest request each endpoint accepts.
func canaryBody(path, served string) (map[string]any, error) {
	switch path {
	case engine.CanaryCompletions:
		return map[string]any{"model": served, "prompt": "ping", "max_tokens": 1}, nil
	case engine.CanaryChat:
		return map[string]any{"model": served, "messages": []map[string]string{{"role": "user", "content": "ping"}}, "max_tokens": 1}, nil
	case engine.CanaryEmbeddings:
		return map[string]any{"model": served, "input": "ping"}, nil
	}
	return nil, fmt.Errorf("canary: unknown endpoint %q", path)
}

// Canary implements Prober.
func (p HTTPProber) Canary(ctx context.Context) error {
	if p.CanaryPath == "" {
		return nil
	}
	body, err := canaryBody(p.CanaryPath, p.Served)
	if err != nil {
		return err
	}
	for k, v := range p.CanaryFields {
		body[k] = v
	}
	b, _ := json.Marshal(body)
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, http.MethodPost, p.Base+p.CanaryPath, bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("canary: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.client().Do(req)
	if err != nil {
		return fmt.Errorf("canary: %w", err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("canary POST %s: %d %s", p.CanaryPath, resp.StatusCode, bytes.TrimSpace(out))
	}
	return nil
}

// Scrape implements Prober.
func (p HTTPProber) Scrape(ctx context.Context) (engine.Metrics, error) {
	if err := p.get(ctx, "/health", nil); err != nil {
		return engine.Metrics{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.Base+"/metrics", nil)
	if err != nil {
		return engine.Metrics{}, err
	}
	resp, err := p.client().Do(req)
	if err != nil {
		return engine.Metrics{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return engine.Metrics{}, fmt.Errorf("GET /metrics: %d", resp.StatusCode)
	}
	return engine.ParseVLLMMetrics(resp.Body)
}

func (p HTTPProber) get(ctx context.Context, path string, into any) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.Base+path, nil)
	if err != nil {
		return err
	}
	resp, err := p.client().Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %d", path, resp.StatusCode)
	}
	if into == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20)) // keep the connection reusable
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(into); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}

// GroupProber is the Prober of a data-parallel group with several API
// servers (hybrid or external load balancing): the group is ready when
// every server is, a canary goes to each, and a scrape merges their
// /metrics (engine.MergeServers). One server failing fails the probe: the
// group shares its fate.
type GroupProber struct {
	Servers []engine.APIServer
	Probers []Prober // one per server, in the same order
}

// Ready implements Prober.
func (g GroupProber) Ready(ctx context.Context) error {
	for i, p := range g.Probers {
		if err := p.Ready(ctx); err != nil {
			return fmt.Errorf("API server %s (DP ranks %s): %w", g.Servers[i].Addr, rankRange(g.Servers[i]), err)
		}
	}
	return nil
}

// Canary implements Prober.
func (g GroupProber) Canary(ctx context.Context) error {
	for i, p := range g.Probers {
		if err := p.Canary(ctx); err != nil {
			return fmt.Errorf("API server %s (DP ranks %s): %w", g.Servers[i].Addr, rankRange(g.Servers[i]), err)
		}
	}
	return nil
}

// Scrape implements Prober.
func (g GroupProber) Scrape(ctx context.Context) (engine.Metrics, error) {
	ms := make([]engine.Metrics, len(g.Probers))
	errs := make([]error, len(g.Probers))
	var wg sync.WaitGroup
	for i, p := range g.Probers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ms[i], errs[i] = p.Scrape(ctx)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return engine.Metrics{}, fmt.Errorf("API server %s (DP ranks %s): %w", g.Servers[i].Addr, rankRange(g.Servers[i]), err)
		}
	}
	return engine.MergeServers(ms), nil
}

func rankRange(s engine.APIServer) string {
	if s.Ranks <= 1 {
		return strconv.Itoa(s.FirstRank)
	}
	return fmt.Sprintf("%d-%d", s.FirstRank, s.FirstRank+s.Ranks-1)
}
