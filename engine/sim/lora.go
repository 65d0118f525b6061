package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// LoRA as vLLM serves it (docs/design/adapters.md §A2):
//
//   - --enable-lora with --max-loras (adapters in one batch), --max-lora-rank
//     and --max-cpu-loras (adapters the worker keeps loaded, LRU);
//   - with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True the API server serves
//     POST /v1/load_lora_adapter {"lora_name","lora_path"} and
//     /v1/unload_lora_adapter {"lora_name"} (without it: 404, no route);
//   - a load reads the adapter's adapter_config.json ("r": the rank) and
//     loads it into the worker's cache, evicting the least recently used
//     adapter when the cache is full (vLLM refuses nothing for want of
//     room); registered adapters are model ids (/v1/models, parent = base);
//   - the scheduler runs at most --max-loras distinct adapters in a step:
//     a request whose adapter would be one too many waits while later ones
//     go ahead; a step that brings an adapter back from disk pays its load;
//   - vllm:lora_requests_info{running_lora_adapters,waiting_lora_adapters,
//     max_lora} set to the time of the last step.

// loraConfig is what the engine was started with.
type loraConfig struct {
	enabled                bool
	maxLoras, maxRank, cpu int
	runtime                bool // VLLM_ALLOW_RUNTIME_LORA_UPDATING
}

// vLLM's --max-lora-rank choices.
var loraRanks = []int{1, 8, 16, 32, 64, 128, 256, 320, 512}

func parseLoRA(fs *flagSet) (loraConfig, error) {
	c := loraConfig{enabled: fs.boolean("--enable-lora")}
	var err error
	if c.maxLoras, err = fs.integer("--max-loras", 1); err != nil {
		return c, err
	}
	if c.maxRank, err = fs.integer("--max-lora-rank", 16); err != nil {
		return c, err
	}
	if c.cpu, err = fs.integer("--max-cpu-loras", 0); err != nil {
		return c, err
	}
	if !slices.Contains(loraRanks, c.maxRank) {
		return c, fmt.Errorf("vllm serve: error: argument --max-lora-rank: invalid choice: %d (choose from 1, 8, 16, 32, 64, 128, 256, 320, 512)", c.maxRank)
	}
	if c.cpu == 0 {
		c.cpu = c.maxLoras
	}
	if c.enabled && c.cpu < c.maxLoras {
		return c, fmt.Errorf("ValueError: max_cpu_loras (%d) must be >= max_loras (%d)", c.cpu, c.maxLoras)
	}
	switch strings.ToLower(os.Getenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")) {
	case "1", "true":
		c.runtime = true
	}
	return c, nil
}

// loraAdapter is one registered adapter.
type loraAdapter struct {
	name, path string
	rank       int
	id         int
}

// loras is the API server's registry (OpenAIServingModels.lora_requests).
type loras struct {
	cfg    loraConfig
	mu     sync.Mutex
	byName map[string]*loraAdapter // guarded by mu
	order  []string                // guarded by mu; registration order
	nextID int                     // guarded by mu
}

func newLoras(c loraConfig) *loras { return &loras{cfg: c, byName: map[string]*loraAdapter{}} }

// has reports whether name is a registered adapter.
func (l *loras) has(name string) bool {
	if l == nil {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byName[name] != nil
}

func (l *loras) list() []*loraAdapter {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*loraAdapter, 0, len(l.order))
	for _, n := range l.order {
		out = append(out, l.byName[n])
	}
	return out
}

// errNoAdapter is vLLM's message for a path with no adapter.
var errNoAdapter = errors.New("No adapter found")

// readAdapterRank reads the PEFT adapter_config.json at path.
func readAdapterRank(path string) (int, error) {
	b, err := os.ReadFile(filepath.Join(path, "adapter_config.json"))
	if err != nil {
		return 0, fmt.Errorf("Loading lora %s failed: %w for %s", filepath.Base(path), errNoAdapter, path)
	}
	var cfg struct {
		R int `json:"r"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.R < 1 {
		return 0, fmt.Errorf("Loading lora %s failed: adapter_config.json has no valid \"r\"", path)
	}
	return cfg.R, nil
}

func (s *Server) loadLoRA(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	var req struct {
		Name string `json:"lora_name"`
		Path string `json:"lora_path"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, 400, "BadRequestError", validationMessage(err), nil)
		return
	}
	if req.Name == "" || req.Path == "" {
		writeError(w, 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.", nil)
		return
	}
	l := s.loras
	l.mu.Lock()
	if l.byName[req.Name] != nil {
		l.mu.Unlock()
		writeError(w, 400, "InvalidUserInput", fmt.Sprintf("The lora adapter '%s' has already been loaded.", req.Name), nil)
		return
	}
	l.mu.Unlock()
	// engine_client.add_lora: the worker loads the weights (a load's time)
	// and checks them against the engine's LoRA config.
	if !l.cfg.enabled {
		writeError(w, 400, "BadRequestError", "LoRA is not enabled. Use --enable-lora to enable LoRA.", nil)
		return
	}
	rank, err := readAdapterRank(req.Path)
	if err != nil {
		code, typ := 400, "BadRequestError"
		if errors.Is(err, errNoAdapter) {
			code, typ = 404, "NotFoundError"
		}
		writeError(w, code, typ, err.Error(), nil)
		return
	}
	if rank > l.cfg.maxRank {
		writeError(w, 400, "BadRequestError", fmt.Sprintf("LoRA rank %d is greater than max_lora_rank %d.", rank, l.cfg.maxRank), nil)
		return
	}
	s.eng.clock.Sleep(s.eng.p.LoRALoad)
	l.mu.Lock()
	if l.byName[req.Name] != nil { // a concurrent load of the same name won
		l.mu.Unlock()
		writeError(w, 400, "InvalidUserInput", fmt.Sprintf("The lora adapter '%s' has already been loaded.", req.Name), nil)
		return
	}
	l.nextID++
	l.byName[req.Name] = &loraAdapter{name: req.Name, path: req.Path, rank: rank, id: l.nextID}
	l.order = append(l.order, req.Name)
	l.mu.Unlock()
	s.engines(func(e *Engine) { e.cacheLoRA(req.Name) })
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(200)
	fmt.Fprintf(w, "Success: LoRA adapter '%s' added successfully.", req.Name)
}

func (s *Server) unloadLoRA(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	var req struct {
		Name string `json:"lora_name"`
		ID   int    `json:"lora_int_id"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, 400, "BadRequestError", validationMessage(err), nil)
		return
	}
	if req.Name == "" && req.ID == 0 {
		writeError(w, 400, "InvalidUserInput", "either 'lora_name' and 'lora_int_id' needs to be provided.", nil)
		return
	}
	l := s.loras
	l.mu.Lock()
	if l.byName[req.Name] == nil {
		l.mu.Unlock()
		writeError(w, 404, "NotFoundError", fmt.Sprintf("The lora adapter '%s' cannot be found.", req.Name), nil)
		return
	}
	delete(l.byName, req.Name)
	l.order = slices.DeleteFunc(l.order, func(n string) bool { return n == req.Name })
	l.mu.Unlock()
	s.engines(func(e *Engine) { e.dropLoRA(req.Name) })
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(200)
	fmt.Fprintf(w, "Success: LoRA adapter '%s' removed successfully.", req.Name)
}

// loraCards are the registered adapters' /v1/models entries.
func (s *Server) loraCards() []any {
	var out []any
	for _, a := range s.loras.list() {
		out = append(out, map[string]any{"id": a.name, "object": "model", "created": s.created, "owned_by": "vllm", "root": a.path,
			"parent": s.cfg.served, "max_model_len": nil, "permission": []any{map[string]any{"id": fmt.Sprintf("modelperm-lora-%d", a.id),
				"object": "model_permission", "created": s.created, "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
				"allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false, "organization": "*", "group": nil, "is_blocking": false}}})
	}
	return out
}

// loraSched is an engine's share of LoRA: the worker's cache of loaded
// adapters and the step's limit. Guarded by the engine's mu.
type loraSched struct {
	maxLoras, cpu int
	cache         []string // least recently used first
}

func (e *Engine) cacheLoRA(name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.lora != nil {
		e.lora.touch(name, e.activeLoRAs())
	}
}

func (e *Engine) dropLoRA(name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.lora != nil {
		e.lora.cache = slices.DeleteFunc(e.lora.cache, func(n string) bool { return n == name })
	}
}

// touch marks name used; it reports whether it had to be loaded (not in
// the cache), evicting the least recently used adapter not in active when
// the cache is full.
func (l *loraSched) touch(name string, active map[string]bool) bool {
	if i := slices.Index(l.cache, name); i >= 0 {
		l.cache = append(slices.Delete(l.cache, i, i+1), name)
		return false
	}
	for len(l.cache) >= l.cpu {
		j := slices.IndexFunc(l.cache, func(n string) bool { return !active[n] })
		if j < 0 {
			break
		}
		l.cache = slices.Delete(l.cache, j, j+1)
	}
	l.cache = append(l.cache, name)
	return true
}

// activeLoRAs are the adapters of the running requests. Caller holds mu.
func (e *Engine) activeLoRAs() map[string]bool {
	out := map[string]bool{}
	for _, r := range e.running {
		if r.lora != "" {
			out[r.lora] = true
		}
	}
	return out
}

// loraFits: r may join the running batch without a step running more than
// --max-loras distinct adapters. Caller holds mu.
func (e *Engine) loraFits(r *request, active map[string]bool) bool {
	if r.lora == "" || e.lora == nil || active[r.lora] {
		return true
	}
	return len(active) < e.lora.maxLoras
}

// loraInfo sets vllm:lora_requests_info from the queues. Caller holds mu.
func (e *Engine) loraInfo() {
	if e.lora == nil || e.m.loraInfo == nil {
		return
	}
	names := func(rs []*request) string {
		set := map[string]bool{}
		for _, r := range rs {
			if r.lora != "" {
				set[r.lora] = true
			}
		}
		out := make([]string, 0, len(set))
		for n := range set {
			out = append(out, n)
		}
		sort.Strings(out)
		return strings.Join(out, ",")
	}
	e.m.loraInfo.Reset()
	e.m.loraInfo.WithLabelValues(names(e.running), names(e.waiting), itoa(e.lora.maxLoras)).Set(float64(time.Now().UnixNano()) / 1e9)
}

// enableLoRA gives the engine its LoRA limits and the metric.
func (e *Engine) enableLoRA(c loraConfig) {
	if !c.enabled {
		return
	}
	e.lora = &loraSched{maxLoras: c.maxLoras, cpu: c.cpu}
	e.m.loraInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vllm:lora_requests_info", Help: "Running stats on lora requests."},
		[]string{"running_lora_adapters", "waiting_lora_adapters", "max_lora"})
	e.m.reg.MustRegister(e.m.loraInfo)
}

// adapterOf is the adapter a request's model names ("": the base model).
func (s *Server) adapterOf(model string) string {
	if model != s.cfg.served && s.loras.has(model) {
		return model
	}
	return ""
}

// LoRA costs where a preset leaves them out. ASSUMED, not measured: vLLM
// publishes no adapter load time; a rank-16 adapter of an 8-70B model is
// tens to hundreds of MB read from local disk and copied to the GPU
// (docs/design/adapters.md §A2). SHOAL_SIM_LORA_LOAD (a Go duration)
// overrides the load time.
const (
	defaultLoRALoad       = 200 * time.Millisecond
	defaultLoRAPerAdapter = time.Millisecond
)

func loraCosts(p Params) Params {
	if p.Base > 0 || p.PrefillPerToken > 0 { // the instant preset stays free
		if p.LoRALoad == 0 {
			p.LoRALoad = defaultLoRALoad
		}
		if p.LoRAPerAdapter == 0 {
			p.LoRAPerAdapter = defaultLoRAPerAdapter
		}
	}
	if v := os.Getenv("SHOAL_SIM_LORA_LOAD"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d >= 0 {
			p.LoRALoad = d
		}
	}
	return p
}

// EnableLoRA starts an in-process server (NewServer) as `vllm serve
// --enable-lora --max-loras maxLoras --max-lora-rank maxRank --max-cpu-loras
// cpu` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True would be (benchmarks).
// Call it before Handler and Run.
func (s *Server) EnableLoRA(maxLoras, maxRank, cpu int) {
	c := loraConfig{enabled: true, maxLoras: maxLoras, maxRank: maxRank, cpu: cpu, runtime: true}
	s.cfg.lora = c
	s.loras = newLoras(c)
	s.eng.p = loraCosts(s.eng.p)
	s.eng.enableLoRA(c)
}
