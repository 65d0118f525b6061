package engine

import (
	"strings"

	"github.com/shoalhq/shoal/spec"
)

// The API paths a head's readiness probe and idle canary may use: a model
// answers only the ones its runner serves (a pooling model refuses
// completions with a 400, a generative one refuses embeddings).
const (
	CanaryCompletions = "/v1/completions"
	CanaryChat        = "/v1/chat/completions"
	CanaryEmbeddings  = "/v1/embeddings"
)

// CanaryPath is the endpoint the canary of s's engine uses: engine.canary
// when the spec sets it ("none" turns it off), else /v1/embeddings for a
// pooling model (vLLM --runner pooling, --task embed, --convert embed;
// SGLang --is-embedding) and /v1/completions for a generative one.
func CanaryPath(s *spec.Deployment) string {
	switch s.Engine.Canary {
	case spec.CanaryCompletions:
		return CanaryCompletions
	case spec.CanaryChat:
		return CanaryChat
	case spec.CanaryEmbeddings:
		return CanaryEmbeddings
	case spec.CanaryNone:
		return ""
	}
	if pooling(s.Engine.Args) {
		return CanaryEmbeddings
	}
	return CanaryCompletions
}

// pooling reads the engine arguments that make vLLM (or SGLang) serve a
// pooling model.
func pooling(args []string) bool {
	for i := 0; i < len(args); i++ {
		name, val, has := strings.Cut(args[i], "=")
		if !has && i+1 < len(args) {
			val = args[i+1]
		}
		switch strings.ReplaceAll(name, "_", "-") {
		case "--runner":
			if val == "pooling" {
				return true
			}
		case "--task":
			switch val {
			case "embed", "embedding", "classify", "score", "reward":
				return true
			}
		case "--convert":
			if val == "embed" || val == "classify" || val == "reward" {
				return true
			}
		case "--is-embedding":
			return true
		}
	}
	return false
}
