package sim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/shoalhq/shoal/internal/kvhash"
)

// kvEventsConfig is vLLM's KVEventsConfig (vllm/config/kv_events.py), as
// --kv-events-config takes it: a JSON object of these fields.
type kvEventsConfig struct {
	EnableKVCacheEvents bool    `json:"enable_kv_cache_events"`
	Publisher           *string `json:"publisher"`
	Endpoint            string  `json:"endpoint"`
	ReplayEndpoint      *string `json:"replay_endpoint"`
	BufferSteps         int     `json:"buffer_steps"`
	HWM                 int     `json:"hwm"`
	MaxQueueSize        int     `json:"max_queue_size"`
	Topic               string  `json:"topic"`
}

// hashAlgos are --prefix-caching-hash-algo's choices.
var hashAlgos = []string{"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"}

// parseKVEvents reads --kv-events-config as vLLM does: unknown fields and
// wrong types are errors; publisher defaults to "zmq" when events are on.
func parseKVEvents(raw string) (*kvEventsConfig, error) {
	if raw == "" {
		return nil, nil
	}
	c := kvEventsConfig{Endpoint: "tcp://*:5557", BufferSteps: 10_000, HWM: 100_000, MaxQueueSize: 100_000}
	dec := json.NewDecoder(bytes.NewReader([]byte(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("vllm serve: error: argument --kv-events-config: 1 validation error for KVEventsConfig: %v", err)
	}
	if c.Publisher == nil {
		p := "null"
		if c.EnableKVCacheEvents {
			p = "zmq"
		}
		c.Publisher = &p
	}
	if *c.Publisher != "null" && *c.Publisher != "zmq" {
		return nil, fmt.Errorf("vllm serve: error: argument --kv-events-config: 1 validation error for KVEventsConfig\npublisher\n  Input should be 'null' or 'zmq' [input_value=%s]", strconv.Quote(*c.Publisher))
	}
	if !c.EnableKVCacheEvents || *c.Publisher != "zmq" {
		return nil, nil
	}
	return &c, nil
}

// startKVEvents opens the publisher and names blocks as the engine's
// settings say: PYTHONHASHSEED seeds NONE_HASH (random without it, as in
// vLLM); with an algorithm other than sha256_cbor the simulator still chains
// sha256 over CBOR but under a seed of its own, so that nothing outside it
// could compute the names (a real engine's pickle-based hashes cannot be
// reproduced outside Python either).
func startKVEvents(s *Server, c *kvEventsConfig, algo string) (*kvevents.Publisher, error) {
	if algo == kvhash.AlgoSGLangPage {
		return startSGLangKVEvents(s, c)
	}
	seed := os.Getenv("PYTHONHASHSEED")
	if algo != "sha256_cbor" && seed != "" {
		seed = algo + ":" + seed
	}
	s.eng.setHashSeed(seed)
	if c == nil {
		return nil, nil
	}
	replay := ""
	if c.ReplayEndpoint != nil {
		replay = *c.ReplayEndpoint
	}
	drop := envFloat("SHOAL_SIM_KV_EVENTS_DROP", 0)
	pub, err := kvevents.NewPublisher(c.Endpoint, replay, c.Topic, c.BufferSteps, min(drop, 1))
	if err != nil {
		return nil, err
	}
	s.eng.publish = pub.Publish
	return pub, nil
}

// startSGLangKVEvents is SGLang's side: pages named by its SHA-256 page
// chain (no seed), one BlockStored per page, batches in its positional
// encoding.
func startSGLangKVEvents(s *Server, c *kvEventsConfig) (*kvevents.Publisher, error) {
	n, err := kvhash.NewSGLang(s.eng.p.BlockSize)
	if err != nil {
		return nil, err
	}
	s.eng.namer, s.eng.perPage = n, true
	replay := ""
	if c.ReplayEndpoint != nil {
		replay = *c.ReplayEndpoint
	}
	pub, err := kvevents.NewPublisher(c.Endpoint, replay, c.Topic, c.BufferSteps, min(envFloat("SHOAL_SIM_KV_EVENTS_DROP", 0), 1))
	if err != nil {
		return nil, err
	}
	pub.Encoding(kvevents.EncodeSGLang)
	s.eng.publish = pub.Publish
	return pub, nil
}

func validHashAlgo(a string) bool { return slices.Contains(hashAlgos, a) }

// quoteList writes choices as argparse does: 'a', 'b', 'c'.
func quoteList(xs []string) string {
	var b bytes.Buffer
	for i, x := range xs {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("'" + x + "'")
	}
	return b.String()
}
