package spec

import (
	"bytes"
	"fmt"
	"regexp"
	"slices"
	"strconv"

	"gopkg.in/yaml.v3"
)

// LoRA turns on the engine's LoRA adapters, loaded and unloaded at run time
// (vLLM kinds; docs/design/adapters.md). Its settings shape the engines: a
// change rolls the groups over. The adapters themselves (Deployment.Adapters)
// change without replacing anything.
type LoRA struct {
	// MaxLoras is vLLM's --max-loras: how many distinct adapters one batch
	// may run (default 4).
	MaxLoras int `yaml:"maxLoras,omitempty" json:"maxLoras,omitempty"`
	// MaxLoraRank is --max-lora-rank: the largest adapter rank the engine
	// takes (default 16; one of vLLM's 1, 8, 16, 32, 64, 128, 256, 320, 512).
	MaxLoraRank int `yaml:"maxLoraRank,omitempty" json:"maxLoraRank,omitempty"`
	// MaxCPULoras is --max-cpu-loras: how many adapters an engine keeps
	// loaded (default 16, at least maxLoras). shoal never has an engine hold
	// more, so the engine never evicts one behind its back.
	MaxCPULoras int `yaml:"maxCpuLoras,omitempty" json:"maxCpuLoras,omitempty"`
}

// Adapter is one LoRA adapter of a deployment's base model.
type Adapter struct {
	// Name is what clients send as `model`; unique among every deployment's
	// served names and adapters.
	Name string `yaml:"name" json:"name"`
	// Source is where the weights are: hf://org/name[@rev], s3://bucket/prefix,
	// gs://bucket/prefix or a path on every host.
	Source string `yaml:"source" json:"source"`
	// Rank is the adapter's LoRA rank (its adapter_config.json "r"), at most
	// engine.lora.maxLoraRank.
	Rank int `yaml:"rank" json:"rank"`
	// MaxReplicas bounds how many replicas hold it at once (0: any number).
	MaxReplicas int `yaml:"maxReplicas,omitempty" json:"maxReplicas,omitempty"`
}

// LoRA defaults.
const (
	DefaultMaxLoras    = 4
	DefaultMaxLoraRank = 16
	DefaultMaxCPULoras = 16
)

// LoRARanks are the ranks vLLM's --max-lora-rank accepts.
var LoRARanks = []int{1, 8, 16, 32, 64, 128, 256, 320, 512}

// LoRAFlags are the engine flags shoal sets from engine.lora.
var LoRAFlags = []string{"--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras"}

// adapterNameRE is what a model name sent by a client may be here: it
// travels in gossip-free reports and metric labels.
var adapterNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// MaxAdapters bounds a deployment's adapters (each is a line in every
// head's report).
const MaxAdapters = 1000

func (l *LoRA) defaults() {
	if l.MaxLoras == 0 {
		l.MaxLoras = DefaultMaxLoras
	}
	if l.MaxLoraRank == 0 {
		l.MaxLoraRank = DefaultMaxLoraRank
	}
	if l.MaxCPULoras == 0 {
		l.MaxCPULoras = max(DefaultMaxCPULoras, l.MaxLoras)
	}
}

// Slots is how many adapters one engine of d holds (0: no LoRA).
func (d *Deployment) Slots() int {
	if l := d.Engine.LoRA; l != nil {
		return l.MaxCPULoras
	}
	return 0
}

// validateLoRA checks engine.lora and the adapters.
func validateLoRA(d *Deployment) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	l := d.Engine.LoRA
	if l != nil {
		if !vllmKind(d.Engine.Kind) {
			bad("engine.lora", "runtime LoRA adapters are supported with the vllm and ray-vllm engines, not %q", d.Engine.Kind)
		}
		if d.Engine.DataParallel != nil {
			bad("engine.lora", "LoRA adapters with engine.dataParallel are not supported yet")
		}
		if d.Engine.KVTransfer != nil {
			bad("engine.lora", "LoRA adapters on a prefill/decode engine are not supported yet")
		}
		if l.MaxLoras < 1 || l.MaxLoras > 256 {
			bad("engine.lora.maxLoras", "must be 1 to 256, got %d", l.MaxLoras)
		}
		if !slices.Contains(LoRARanks, l.MaxLoraRank) {
			bad("engine.lora.maxLoraRank", "must be one of vLLM's %v, got %d", LoRARanks, l.MaxLoraRank)
		}
		if l.MaxCPULoras < l.MaxLoras || l.MaxCPULoras > MaxAdapters {
			bad("engine.lora.maxCpuLoras", "must be at least maxLoras (%d) and at most %d, got %d", l.MaxLoras, MaxAdapters, l.MaxCPULoras)
		}
		errs = append(errs, refuseOwned(d.Engine.Args, LoRAFlags, "engine.lora")...)
	}
	if len(d.Adapters) == 0 {
		return errs
	}
	if l == nil {
		bad("adapters", "need engine.lora: the engine is started with LoRA slots (`engine: {lora: {maxLoras: 4, maxLoraRank: 16}}`); adding it rolls the replicas over")
		return errs
	}
	if len(d.Adapters) > MaxAdapters {
		bad("adapters", "at most %d adapters, got %d", MaxAdapters, len(d.Adapters))
	}
	seen := map[string]int{}
	for i, a := range d.Adapters {
		f := "adapters[" + strconv.Itoa(i) + "]"
		for _, e := range CheckAdapter(a, l.MaxLoraRank) {
			bad(f+"."+e.Field, "%s", e.Msg)
		}
		if j, dup := seen[a.Name]; dup && a.Name != "" {
			bad(f+".name", "%q is already the name of adapters[%d]", a.Name, j)
		}
		seen[a.Name] = i
		if a.Name == d.Engine.ServedModelName {
			bad(f+".name", "%q is the deployment's own served model name", a.Name)
		}
	}
	return errs
}

// CheckAdapter checks one adapter against an engine's largest rank; the
// fields named are the adapter's own.
func CheckAdapter(a Adapter, maxRank int) []*Error {
	var errs []*Error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	if !adapterNameRE.MatchString(a.Name) {
		bad("name", "%q must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", a.Name)
	}
	if a.Source == "" {
		bad("source", "is required (hf://org/name, s3://bucket/prefix, gs://bucket/prefix or /path)")
	} else if err := checkSource(a.Source); err != nil {
		bad("source", "%v", err)
	}
	switch {
	case a.Rank < 1:
		bad("rank", "is required: the adapter's LoRA rank (adapter_config.json \"r\"), got %d", a.Rank)
	case a.Rank > maxRank:
		bad("rank", "%d is above the engine's largest rank, engine.lora.maxLoraRank %d; raise it (the replicas roll over) or use a smaller adapter", a.Rank, maxRank)
	}
	if a.MaxReplicas < 0 {
		bad("maxReplicas", "must be 0 (any number) or more, got %d", a.MaxReplicas)
	}
	return errs
}

// Adapter returns d's adapter of that name.
func (d *Deployment) Adapter(name string) (Adapter, bool) {
	for _, a := range d.Adapters {
		if a.Name == name {
			return a, true
		}
	}
	return Adapter{}, false
}

// WithAdapters is the spec YAML src with its adapters replaced by ads (the
// key removed when ads is empty), the rest of the document — comments and
// order included — as it was: `shoal adapter add|remove` stores a spec the
// user still recognises.
func WithAdapters(src []byte, ads []Adapter) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(src, &doc); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalid, yamlMessage(err))
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%w: the spec is not a YAML mapping", ErrInvalid)
	}
	root := doc.Content[0]
	var val yaml.Node
	if err := val.Encode(ads); err != nil {
		return nil, err
	}
	val.Style = 0
	for i := 0; i+1 < len(root.Content); i += 2 {
		if root.Content[i].Value == "adapters" {
			if len(ads) == 0 {
				root.Content = slices.Delete(root.Content, i, i+2)
			} else {
				root.Content[i+1] = &val
			}
			return encodeYAML(&doc)
		}
	}
	if len(ads) > 0 {
		root.Content = append(root.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: "adapters"}, &val)
	}
	return encodeYAML(&doc)
}

func encodeYAML(n *yaml.Node) ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(n); err != nil {
		return nil, err
	}
	_ = enc.Close()
	return b.Bytes(), nil
}

// HasAdaptersKey says whether the spec YAML names adapters at all (an empty
// list included).
func HasAdaptersKey(src []byte) bool {
	var top map[string]yaml.Node
	if yaml.Unmarshal(src, &top) != nil {
		return false
	}
	_, ok := top["adapters"]
	return ok
}
