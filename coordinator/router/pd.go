package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

// prefillStrategy picks prefill engines: by prefix-cache affinity when the
// request asks for it (the prompt is computed there: that is where a
// cached prefix saves work), else by queue (least-request). Decode engines
// are picked by the request's strategy (least-request by default: running
// requests).
func prefillStrategy(strategy string) string {
	if strategy == StrategyPrefixCache || strategy == StrategyPrefixAIBrix {
		return strategy
	}
	return StrategyLeastRequest
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
		db, status, out, err := r.prefillHop(ctx, ep.Addr, req.URL.Path, pinRank(hdr, ep), pb, body)
		lease.release()
		if d := r.picker.outcome(ep.Addr, err != nil, r.cfg.EjectAfter, r.cfg.EjectFor); d > 0 {
			r.ejections.WithLabelValues("prefill").Inc()
		}
		if err == nil {
			r.prefills.WithLabelValues("ok").Inc()
			return db, nil
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

// prefillHop sends prefill body pb to the engine at addr and returns the
// decode body: the client's body with the engine's kv_transfer_params. An
// error answer is returned as it came (status, body); a 200 without
// kv_transfer_params (not a NixlConnector engine) is a 502.
func (r *Router) prefillHop(ctx context.Context, addr, path string, hdr []h1.Header, pb, body []byte) (db []byte, status int, out []byte, err error) {
	status, out, err = r.post(ctx, addr, path, hdr, pb)
	if err == nil && status != 200 {
		err = fmt.Errorf("prefill engine %s answered %d", addr, status)
	}
	if err != nil {
		return nil, status, out, err
	}
	var resp struct {
		KV json.RawMessage `json:"kv_transfer_params"`
	}
	if json.Unmarshal(out, &resp) != nil || len(resp.KV) == 0 || string(resp.KV) == "null" {
		return nil, 502, nil, fmt.Errorf("prefill engine %s answered without kv_transfer_params: is it a NixlConnector engine?", addr)
	}
	if db, err = decodeBody(body, resp.KV); err != nil {
		return nil, 502, nil, err
	}
	return db, 200, out, nil
}

// post sends a buffered request and reads the whole answer.
func (r *Router) post(ctx context.Context, addr, path string, hdr []h1.Header, body []byte) (int, []byte, error) {
	resp, err := r.up.Do(ctx, addr, http.MethodPost, path, hdr, body, max(r.cfg.IdleTimeout, 30*time.Second))
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

// prefillFailed answers a request a prefill engine refused (a 4xx: the
// request itself is wrong) with that engine's answer.
func (r *Router) prefillFailed(w aborter, model string, f *prefillFailure) {
	r.requests.WithLabelValues(model, "prefill", strconv.Itoa(f.status)).Inc()
	if len(f.body) == 0 {
		writeError(w, f.status, "invalid_request_error", "", "", fmt.Sprintf("The prefill engine of `%s` refused the request: %v.", model, f.err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(f.status)
	_, _ = w.Write(f.body)
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

// pinRank adds the DP rank header for an endpoint that pins one.
func pinRank(hdr []h1.Header, ep *Endpoint) []h1.Header {
	if !ep.PinRank {
		return hdr
	}
	return append(slices.Clip(hdr), h1.Header{Key: rankHeader, Value: strconv.Itoa(ep.Rank)})
}

// warm sends body through prefill engine p and decode engine d.
func (r *Router) warm(ctx context.Context, p, d *Endpoint, body []byte) error {
	hdr := []h1.Header{{Key: "Content-Type", Value: "application/json"}, {Key: "X-Request-Id", Value: "warm-" + requestID()}}
	if p.BootstrapPort > 0 {
		return r.warmSGLang(ctx, p, d, hdr, body)
	}
	pb, _ := prefillBody(body)
	db, _, out, err := r.prefillHop(ctx, p.Addr, "/v1/completions", pinRank(hdr, p), pb, body)
	if err != nil {
		return fmt.Errorf("warm %s → %s: prefill: %v %s", p.Addr, d.Addr, err, bytes.TrimSpace(out))
	}
	status, out, err := r.post(ctx, d.Addr, "/v1/completions", pinRank(hdr, d), db)
	if err != nil || status != 200 {
		return fmt.Errorf("warm %s → %s: decode: %d %v %s", p.Addr, d.Addr, status, err, bytes.TrimSpace(out))
	}
	return nil
}

// SGLang's protocol (docs/design/pd.md §P2): the same body, with the
// prefill engine's bootstrap_host, bootstrap_port and a random
// bootstrap_room, goes to a prefill and a decode engine at once; the
// decode engine's answer is the client's, the prefill engine's is read and
// dropped.

// sglangGrace is how long a failed decode half waits for the prefill
// half's outcome before cancelling it.
const sglangGrace = 200 * time.Millisecond

// sglangHop is the prefill half of one SGLang attempt, running beside the
// decode half.
type sglangHop struct {
	ep     *Endpoint
	body   []byte          // the body both engines get
	ctx    context.Context // the decode half's: cancelled when the prefill half fails first
	cancel context.CancelFunc
	done   chan error // the prefill half's outcome
	lease  *lease
	// started: the decode engine's answer began (the prefill half's
	// failure no longer cancels it).
	started atomic.Bool
}

// sglangBody is body with the bootstrap fields of prefill engine p.
func sglangBody(body []byte, p *Endpoint, room uint64) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, err
	}
	host, _, err := net.SplitHostPort(p.Addr)
	if err != nil {
		return nil, err
	}
	m["bootstrap_host"], _ = json.Marshal(host)
	m["bootstrap_port"] = json.RawMessage(strconv.Itoa(p.BootstrapPort))
	m["bootstrap_room"] = json.RawMessage(strconv.FormatUint(room, 10))
	return json.Marshal(m)
}

// sglangStart picks a prefill engine not yet tried and sends it the body
// with a new bootstrap room, in the background; nil when none is left.
func (r *Router) sglangStart(ctx context.Context, req *http.Request, prefills []*Endpoint, body []byte, rid, strategy string, h hint, tried map[string]bool) (*sglangHop, error) {
	ep, _, lease := r.picker.pick(strategy, prefills, h, tried)
	if ep == nil {
		return nil, nil
	}
	tried[ep.Addr] = true
	b, err := sglangBody(body, ep, mrand.Uint64()>>1)
	if err != nil {
		lease.release()
		return nil, err
	}
	hdr := pinRank([]h1.Header{{Key: "Content-Type", Value: "application/json"}, {Key: "X-Request-Id", Value: rid}}, ep)
	if v := hget(req.Header, "Authorization"); v != "" {
		hdr = append(hdr, h1.Header{Key: "Authorization", Value: v})
	}
	hop := &sglangHop{ep: ep, body: b, done: make(chan error, 1), lease: lease}
	hop.ctx, hop.cancel = context.WithCancel(ctx)
	go func() {
		status, out, err := r.post(hop.ctx, ep.Addr, req.URL.Path, hdr, b)
		if err == nil && status != 200 {
			err = fmt.Errorf("prefill engine %s answered %d: %s", ep.Addr, status, bytes.TrimSpace(truncateBytes(out, 512)))
		}
		if err != nil && !hop.started.Load() {
			hop.cancel() // the decode engine would wait for KV that is not coming
		}
		hop.done <- err
	}()
	return hop, nil
}

// finish waits for the prefill half and accounts for it: its failure
// counts as the prefill engine's, never as success. It returns the
// failure when it came before the decode engine's answer began (the
// attempt failed because of it, not the decode engine's).
func (r *Router) sglangFinish(hop *sglangHop, a attempt) error {
	var err error
	if a.done && a.status == 200 {
		err = <-hop.done // the client has its answer; the prefill half ends with the KV
	} else {
		// The decode half failed: if the prefill half fails too, it
		// likely caused it (a decode engine cannot reach a dead prefill
		// engine's bootstrap server); give it a moment to say so before
		// cancelling it.
		t := time.NewTimer(sglangGrace)
		select {
		case err = <-hop.done:
		case <-t.C:
			hop.cancel()
			err = <-hop.done
		}
		t.Stop()
	}
	hop.cancel()
	hop.lease.release()
	if d := r.picker.outcome(hop.ep.Addr, err != nil && !errors.Is(err, context.Canceled), r.cfg.EjectAfter, r.cfg.EjectFor); d > 0 {
		r.ejections.WithLabelValues("prefill").Inc()
	}
	switch {
	case err == nil:
		r.prefills.WithLabelValues("ok").Inc()
		return nil
	case errors.Is(err, context.Canceled):
		return nil // cancelled by the decode half's end
	}
	r.prefills.WithLabelValues("failed").Inc()
	if hop.started.Load() {
		return nil
	}
	return err
}

// prefillsExhausted answers a request no prefill engine could take (SGLang:
// a decode engine cannot serve it alone).
func (r *Router) prefillsExhausted(w aborter, model string, err, last error) {
	if err != nil {
		r.requests.WithLabelValues(model, "prefill", "400").Inc()
		writeError(w, 400, "invalid_request_error", "", "", "We could not parse the JSON body of your request: "+err.Error())
		return
	}
	if last == nil {
		r.requests.WithLabelValues(model, "prefill", "503").Inc()
		w.Header().Set("Retry-After", "5")
		writeError(w, 503, "server_error", "", "no_ready_replica", fmt.Sprintf("No prefill replica of `%s` is ready; retry later (see `shoal get replicas`).", model))
		return
	}
	r.requests.WithLabelValues(model, "prefill", "502").Inc()
	writeError(w, 502, "server_error", "", "upstream_unreachable", fmt.Sprintf("No prefill replica of `%s` could prefill the request; the last failed: %v.", model, last))
}

// warmSGLang runs body through an SGLang pair: both engines at once, on a
// room of their own.
func (r *Router) warmSGLang(ctx context.Context, p, d *Endpoint, hdr []h1.Header, body []byte) error {
	b, err := sglangBody(body, p, mrand.Uint64()>>1)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, e := range []*Endpoint{p, d} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, out, err := r.post(ctx, e.Addr, "/v1/completions", pinRank(hdr, e), b)
			if err == nil && status != 200 {
				err = fmt.Errorf("%d %s", status, bytes.TrimSpace(truncateBytes(out, 512)))
			}
			if err != nil {
				errs[i] = fmt.Errorf("warm %s → %s: %s: %v", p.Addr, d.Addr, e.Role, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}
