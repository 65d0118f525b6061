package router

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoalhq/shoal/internal/secretfile"
	"gopkg.in/yaml.v3"
)

// APIKey is one entry of an API keys file. Only the key's SHA-256 is kept,
// on disk and in memory; `shoal apikey create` makes a key and its entry.
type APIKey struct {
	Name   string   `yaml:"name"`
	SHA256 string   `yaml:"sha256"`
	Models []string `yaml:"models"`
	// RPS limits requests per second for this key (0: unlimited); Burst is
	// how many may arrive at once (default: max(1, 2×RPS)).
	RPS   float64 `yaml:"rps,omitempty"`
	Burst int     `yaml:"burst,omitempty"`
}

type keyFile struct {
	Keys []APIKey `yaml:"keys"`
}

// Keys is the set of API keys a router accepts; Replace swaps it while
// requests run (SIGHUP). A nil or empty *Keys means no authentication.
type Keys struct {
	v atomic.Pointer[map[string]*keyState]
}

type keyState struct {
	APIKey
	mu     sync.Mutex
	tokens float64   // guarded by mu
	last   time.Time // guarded by mu
}

// NewKey returns a fresh API key and its file entry.
func NewKey(name string, models []string, rps float64, burst int) (string, APIKey, error) {
	if name == "" || strings.ContainsAny(name, " \t\n:") {
		return "", APIKey{}, fmt.Errorf("key name %q: want a word", name)
	}
	if len(models) == 0 {
		return "", APIKey{}, fmt.Errorf("list the models the key may use (--models m1,m2, or '*')")
	}
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", APIKey{}, err
	}
	key := "sk-shoal-" + hex.EncodeToString(b)
	return key, APIKey{Name: name, SHA256: HashKey(key), Models: models, RPS: rps, Burst: burst}, nil
}

// HashKey is the at-rest form of an API key.
func HashKey(k string) string {
	s := sha256.Sum256([]byte(k))
	return hex.EncodeToString(s[:])
}

// LoadAPIKeys reads an API keys file:
//
//	keys:
//	  - {name: team-a, sha256: 5e88…, models: [deepseek-r1-671b], rps: 10}
//	  - {name: admin, sha256: 9f86…, models: ["*"]}
func LoadAPIKeys(path string) (*Keys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("api keys: %w", secretfile.Explain(path, err))
	}
	var f keyFile
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("api keys file %s: want `keys: [{name, sha256, models, rps}]` (from `shoal apikey create`): %w", path, err)
	}
	m := map[string]*keyState{}
	for i, k := range f.Keys {
		where := fmt.Sprintf("api keys file %s: entry %d (%s)", path, i+1, k.Name)
		h := strings.ToLower(k.SHA256)
		if _, err := hex.DecodeString(h); err != nil || len(h) != 64 {
			return nil, fmt.Errorf("%s: sha256 must be 64 hex digits; keys are stored hashed (`shoal apikey create`)", where)
		}
		if k.Name == "" {
			return nil, fmt.Errorf("%s: name is required", where)
		}
		if len(k.Models) == 0 {
			return nil, fmt.Errorf("%s: list the models it may use, or [\"*\"]", where)
		}
		if k.RPS < 0 || math.IsNaN(k.RPS) || math.IsInf(k.RPS, 0) || k.Burst < 0 {
			return nil, fmt.Errorf("%s: rps and burst must not be negative", where)
		}
		if _, dup := m[h]; dup {
			return nil, fmt.Errorf("%s: the same key is listed twice", where)
		}
		if k.RPS > 0 && k.Burst == 0 {
			k.Burst = max(1, int(math.Ceil(2*k.RPS)))
		}
		k.SHA256 = h
		m[h] = &keyState{APIKey: k, tokens: float64(k.Burst), last: time.Now()}
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("api keys file %s holds no keys (add one with `shoal apikey create --file %s`)", path, path)
	}
	ks := &Keys{}
	ks.v.Store(&m)
	return ks, nil
}

// Replace swaps in another set (a reloaded file).
func (ks *Keys) Replace(o *Keys) { ks.v.Store(o.v.Load()) }

func (ks *Keys) enabled() bool {
	if ks == nil {
		return false
	}
	m := ks.v.Load()
	return m != nil && len(*m) > 0
}

// lookup finds the key for a bearer token.
func (ks *Keys) lookup(tok string) *keyState {
	m := ks.v.Load()
	if m == nil {
		return nil
	}
	return (*m)[HashKey(tok)]
}

// models: nil for any.
func (k *keyState) models() []string {
	if slices.Contains(k.Models, "*") {
		return nil
	}
	return k.Models
}

// take spends one request from the key's bucket; when empty it returns how
// long until one is available.
func (k *keyState) take() (bool, time.Duration) {
	if k.RPS <= 0 {
		return true, 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	now := time.Now()
	k.tokens = min(float64(k.Burst), k.tokens+now.Sub(k.last).Seconds()*k.RPS)
	k.last = now
	if k.tokens >= 1 {
		k.tokens--
		return true, 0
	}
	return false, time.Duration((1 - k.tokens) / k.RPS * float64(time.Second))
}

// MarshalEntry renders one entry for appending to a keys file.
func MarshalEntry(k APIKey) string {
	b, _ := yaml.Marshal([]APIKey{k})
	return string(b)
}
