package router

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/coordinator/router/h1"
)

// Prefill/decode disaggregation with vLLM's NixlConnector (docs/design/pd.md
// §P1): the request goes first to a prefill engine as a one-token,
// non-streamed request asking for remote decode; the kv_transfer_params it
// answers with go, in the original body, to a decode engine, whose answer
// is the client's. Both hops carry the client's X-Request-Id.

// Endpoint roles.
const (
	RolePrefill = "prefill"
	RoleDecode  = "decode"
)

// remoteDecode is what a prefill engine is asked for.
var remoteDecode = json.RawMessage(`{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}`)

// splitRoles separates a model's prefill endpoints from those that serve
// requests whole or decode them; pd is false when the model has no
// prefill role.
func splitRoles(eps []*Endpoint) (prefills, rest []*Endpoint, pd bool) {
	if !slices.ContainsFunc(eps, func(e *Endpoint) bool { return e.Role == RolePrefill }) {
		return nil, eps, false // the hot path of every other model: no allocation
	}
	for _, e := range eps {
		if e.Role == RolePrefill {
			prefills = append(prefills, e)
		} else {
			rest = append(rest, e)
		}
	}
	return prefills, rest, len(prefills) > 0
}

// prefillBody is the body sent to a prefill engine: one token, not
// streamed, remote decode asked for, without stream_options and
// min_tokens (as vLLM's proxy sends it).
func prefillBody(body []byte) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, err
	}
	m["kv_transfer_params"] = remoteDecode
	m["stream"] = json.RawMessage("false")
	m["max_tokens"] = json.RawMessage("1")
	if _, ok := m["max_completion_tokens"]; ok {
		m["max_completion_tokens"] = json.RawMessage("1")
	}
	delete(m, "stream_options")
	delete(m, "min_tokens")
	return json.Marshal(m)
}

// decodeBody is the client's body with the prefill engine's
// kv_transfer_params.
func decodeBody(body []byte, kv json.RawMessage) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, err
	}
	m["kv_transfer_params"] = kv
	return json.Marshal(m)
}

// prefillFailure is why no prefill engine gave the KV.
type prefillFailure struct {
	status int // the last engine answer's status (0: none answered)
	body   []byte
	err    error
}

// prefill runs the first hop on a prefill engine picked by the strategy,
// trying another on a refused connection or an error answer (each counted
// as that engine's failure, never as success), and returns the decode
// body.
func (r *Router) prefill(ctx context.Context, req *http.Request, prefills []*Endpoint, body []byte, rid, strategy string, h hint) ([]byte, *prefillFailure) {
	pb, err := prefillBody(body)
	if err != nil {
		return nil, &prefillFailure{status: 400, err: err}
	}
	hdr := []h1.Header{{Key: "Content-Type", Value: "application/json"}, {Key: "X-Request-Id", Value: rid}}
	if v := hget(req.Header, "Authorization"); v != "" {
		hdr = append(hdr, h1.Header{Key: "Authorization", Value: v})
	}
	tried := map[string]bool{}
	fail := &prefillFailure{err: fmt.Errorf("no prefill engine")}
	for range prefills {
		ep, _, lease := r.picker.pick(strategy, prefills, h, tried)
		if ep == nil {
			break
		}
		tried[ep.Addr] = true
		status, out, err := r.post(ctx, ep.Addr, req.URL.Path, hdr, pb)
		lease.release()
		ok := err == nil && status == 200
		if d := r.picker.outcome(ep.Addr, !ok, r.cfg.EjectAfter, r.cfg.EjectFor); d > 0 {
			r.ejections.WithLabelValues("prefill").Inc()
		}
		if ok {
			var resp struct {
				KV json.RawMessage `json:"kv_transfer_params"`
			}
			if json.Unmarshal(out, &resp) == nil && len(resp.KV) > 0 && string(resp.KV) != "null" {
				db, err := decodeBody(body, resp.KV)
				if err == nil {
					r.prefills.WithLabelValues("ok").Inc()
					return db, nil
				}
			}
			status, err = 502, fmt.Errorf("prefill engine %s answered without kv_transfer_params: is it a NixlConnector engine?", ep.Addr)
		}
		r.prefills.WithLabelValues("failed").Inc()
		r.log.Warn("prefill failed; trying another prefill engine", "backend", ep.Addr, "status", status, "err", err, "request_id", rid)
		fail = &prefillFailure{status: status, body: out, err: err}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fail
}

// post sends a buffered request and reads the whole answer.
func (r *Router) post(ctx context.Context, addr, path string, hdr []h1.Header, body []byte) (int, []byte, error) {
	resp, err := r.up.Do(ctx, addr, http.MethodPost, path, hdr, bytes.Clone(body), max(r.cfg.IdleTimeout, 30*time.Second))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Close()
	b, err := io.ReadAll(io.LimitReader(resp, 16<<20))
	if err != nil {
		return 0, nil, err
	}
	return resp.Status, b, nil
}

// prefillFailed answers a request no prefill engine could take: the last
// engine's error answer, else 502 (a gateway failure, never a success).
func (r *Router) prefillFailed(w aborter, model string, f *prefillFailure) {
	if f.status > 0 && f.status != 200 && len(f.body) > 0 {
		r.requests.WithLabelValues(model, "prefill", strconv.Itoa(f.status)).Inc()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(f.status)
		_, _ = w.Write(f.body)
		return
	}
	r.requests.WithLabelValues(model, "prefill", "502").Inc()
	writeError(w, 502, "server_error", "", "prefill_failed", fmt.Sprintf("No prefill engine of `%s` computed the prompt: %v.", model, f.err))
}

// warmPrompt is long enough to fill more than one KV block (vLLM's
// connector moves whole blocks; a shorter prompt moves nothing).
var warmPrompt = strings.Repeat("shoal warms this prefill and decode pair. ", 8)

// WarmPairs runs one tiny request through every (prefill, decode) pair of
// each disaggregated model in eps, so that the connector's lazy handshake
// (about 5 s per new pair with NIXL) is paid here and not by a user's
// first request. Pairs are warmed in parallel; it returns how many were
// warmed and the errors of those that were not.
func (r *Router) WarmPairs(ctx context.Context, eps []*Endpoint) (int, []error) {
	byModel := map[string][]*Endpoint{}
	for _, e := range eps {
		byModel[e.Model] = append(byModel[e.Model], e)
	}
	type result struct{ err error }
	var wg sync.WaitGroup
	results := make(chan result, len(eps)*len(eps))
	for model, es := range byModel {
		prefills, decodes, pd := splitRoles(es)
		if !pd {
			continue
		}
		body, _ := json.Marshal(map[string]any{"model": model, "prompt": warmPrompt, "max_tokens": 1})
		for _, p := range prefills {
			for _, d := range decodes {
				wg.Add(1)
				go func() {
					defer wg.Done()
					results <- result{r.warm(ctx, p, d, body)}
				}()
			}
		}
	}
	wg.Wait()
	close(results)
	n := 0
	var errs []error
	for res := range results {
		if res.err != nil {
			errs = append(errs, res.err)
			continue
		}
		n++
	}
	return n, errs
}

// warm sends body through prefill engine p and decode engine d.
func (r *Router) warm(ctx context.Context, p, d *Endpoint, body []byte) error {
	pb, _ := prefillBody(body)
	hdr := []h1.Header{{Key: "Content-Type", Value: "application/json"}, {Key: "X-Request-Id", Value: "warm-" + requestID()}}
	status, out, err := r.post(ctx, p.Addr, "/v1/completions", hdr, pb)
	if err != nil || status != 200 {
		return fmt.Errorf("warm %s → %s: prefill: %d %v %s", p.Addr, d.Addr, status, err, bytes.TrimSpace(out))
	}
	var resp struct {
		KV json.RawMessage `json:"kv_transfer_params"`
	}
	if json.Unmarshal(out, &resp) != nil || len(resp.KV) == 0 || string(resp.KV) == "null" {
		return fmt.Errorf("warm %s → %s: the prefill engine returned no kv_transfer_params", p.Addr, d.Addr)
	}
	db, err := decodeBody(body, resp.KV)
	if err != nil {
		return err
	}
	status, out, err = r.post(ctx, d.Addr, "/v1/completions", hdr, db)
	if err != nil || status != 200 {
		return fmt.Errorf("warm %s → %s: decode: %d %v %s", p.Addr, d.Addr, status, err, bytes.TrimSpace(out))
	}
	return nil
}
