package adapters

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// HTTPEngine calls a vLLM API server's adapter endpoints.
type HTTPEngine struct {
	// Base is the server's address, http://host:port.
	Base string
	// APIKey is the engine's --api-key ("" when it has none).
	APIKey string
	Client *http.Client
}

// LoadTimeout bounds one engine call.
const LoadTimeout = 2 * time.Minute

func (h *HTTPEngine) post(ctx context.Context, path string, body any) (int, string, error) {
	b, _ := json.Marshal(body)
	ctx, cancel := context.WithTimeout(ctx, LoadTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.Base+path, bytes.NewReader(b))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	if h.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+h.APIKey)
	}
	c := h.Client
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, errorMessage(rb), nil
}

// errorMessage is an OpenAI-style error's message, else the body.
func errorMessage(b []byte) string {
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
		Message string `json:"message"`
		Detail  any    `json:"detail"`
	}
	if json.Unmarshal(b, &e) == nil {
		switch {
		case e.Error.Message != "":
			return e.Error.Message
		case e.Message != "":
			return e.Message
		case e.Detail != nil:
			return fmt.Sprint(e.Detail)
		}
	}
	return strings.TrimSpace(string(b))
}

// Load is POST /v1/load_lora_adapter.
func (h *HTTPEngine) Load(ctx context.Context, name, path string) error {
	code, msg, err := h.post(ctx, "/v1/load_lora_adapter", map[string]string{"lora_name": name, "lora_path": path})
	switch {
	case err != nil:
		return fmt.Errorf("engine unreachable: %w", err)
	case code == 200:
		return nil
	case code == 400 && strings.Contains(msg, "has already been loaded"):
		return ErrAlreadyLoaded
	case code == 404 && (msg == "Not Found" || msg == ""):
		return fmt.Errorf("the engine serves no /v1/load_lora_adapter (404): it runs without VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
	}
	return fmt.Errorf("engine refused the load (%d): %s", code, msg)
}

// Unload is POST /v1/unload_lora_adapter; an adapter the engine does not
// know is gone already.
func (h *HTTPEngine) Unload(ctx context.Context, name string) error {
	code, msg, err := h.post(ctx, "/v1/unload_lora_adapter", map[string]string{"lora_name": name})
	switch {
	case err != nil:
		return fmt.Errorf("engine unreachable: %w", err)
	case code == 200, code == 404 && strings.Contains(msg, "cannot be found"):
		return nil
	}
	return fmt.Errorf("engine refused the unload (%d): %s", code, msg)
}
