package sim

import (
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The rest of vLLM's OpenAI server: /detokenize, the Responses API (whole
// and streamed as its typed events), and the pooling-model endpoints
// (score, rerank, pooling, classify), which a generative model refuses with
// vLLM's 400.

func (s *Server) detokenize(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	var req struct {
		Tokens []int `json:"tokens"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, 400, "BadRequestError", validationMessage(err), nil)
		return
	}
	writeJSON(w, 200, map[string]any{"prompt": detokenize(req.Tokens)})
}

// poolingOnly answers a generative model's request to a pooling API.
func (s *Server) poolingOnly(w http.ResponseWriter, api string) bool {
	if s.cfg.pooling {
		return true
	}
	writeError(w, 400, "BadRequestError", "The model does not support "+api, nil)
	return false
}

// texts reads a string or a list of strings.
func texts(raw json.RawMessage) ([]string, bool) {
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}, true
	}
	var list []string
	if json.Unmarshal(raw, &list) == nil && len(list) > 0 {
		return list, true
	}
	return nil, false
}

func cosine(a, b []float32) float64 {
	var d float64
	for i := range a {
		d += float64(a[i]) * float64(b[i])
	}
	return (d + 1) / 2 // unit vectors: in [0, 1]
}

// pooled decodes a pooling request, checking model and body.
func (s *Server) pooled(w http.ResponseWriter, r *http.Request, api string, v any) bool {
	if !s.poolingOnly(w, api) {
		return false
	}
	b, ok := s.body(w, r)
	if !ok {
		return false
	}
	if err := json.Unmarshal(b, v); err != nil {
		writeError(w, 400, "BadRequestError", validationMessage(err), nil)
		return false
	}
	var m struct {
		Model string `json:"model"`
	}
	_ = json.Unmarshal(b, &m)
	if m.Model != "" && m.Model != s.cfg.served && m.Model != s.cfg.model {
		param := "model"
		writeError(w, 404, "NotFoundError", fmt.Sprintf("The model `%s` does not exist.", m.Model), &param)
		return false
	}
	return true
}

func (s *Server) score(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model string          `json:"model"`
		Text1 json.RawMessage `json:"text_1"`
		Text2 json.RawMessage `json:"text_2"`
	}
	if !s.pooled(w, r, "Score API", &req) {
		return
	}
	q, ok1 := texts(req.Text1)
	docs, ok2 := texts(req.Text2)
	if !ok1 || !ok2 || len(q) != 1 && len(q) != len(docs) {
		writeError(w, 400, "BadRequestError", "text_1 must be a string or a list as long as text_2", nil)
		return
	}
	data := []map[string]any{}
	n := 0
	for i, d := range docs {
		qi := q[min(i, len(q)-1)]
		n += countTokens(qi) + countTokens(d)
		data = append(data, map[string]any{"index": i, "object": "score", "score": cosine(embed(qi), embed(d))})
	}
	writeJSON(w, 200, map[string]any{"id": "score-" + baseRequestID(r), "object": "list", "created": time.Now().Unix(),
		"model": req.Model, "data": data, "usage": usage{PromptTokens: n, TotalTokens: n}})
}

func (s *Server) rerank(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model     string   `json:"model"`
		Query     string   `json:"query"`
		Documents []string `json:"documents"`
		TopN      int      `json:"top_n"`
	}
	if !s.pooled(w, r, "Rerank API", &req) {
		return
	}
	if len(req.Documents) == 0 {
		param := "documents"
		writeError(w, 400, "BadRequestError", "documents must not be empty", &param)
		return
	}
	type result struct {
		Index    int               `json:"index"`
		Document map[string]string `json:"document"`
		Score    float64           `json:"relevance_score"`
	}
	var res []result
	n := 0
	for i, d := range req.Documents {
		n += countTokens(req.Query) + countTokens(d)
		res = append(res, result{Index: i, Document: map[string]string{"text": d}, Score: cosine(embed(req.Query), embed(d))})
	}
	sort.SliceStable(res, func(i, j int) bool { return res[i].Score > res[j].Score })
	if req.TopN > 0 && req.TopN < len(res) {
		res = res[:req.TopN]
	}
	writeJSON(w, 200, map[string]any{"id": "rerank-" + baseRequestID(r), "model": req.Model,
		"usage": map[string]int{"total_tokens": n}, "results": res})
}

// perInput serves a pooling API that answers each input alone (pooling,
// classify): one item per input, from item; id is the answer's id prefix.
func (s *Server) perInput(w http.ResponseWriter, r *http.Request, api, id string, item func(i int, text string) map[string]any) {
	var req struct {
		Model string          `json:"model"`
		Input json.RawMessage `json:"input"`
	}
	if !s.pooled(w, r, api, &req) {
		return
	}
	in, ok := texts(req.Input)
	if !ok {
		param := "input"
		writeError(w, 400, "BadRequestError", "input must be a string or a non-empty list of strings", &param)
		return
	}
	data := []map[string]any{}
	n := 0
	for i, t := range in {
		n += countTokens(t)
		data = append(data, item(i, t))
	}
	writeJSON(w, 200, map[string]any{"id": id + baseRequestID(r), "object": "list", "created": time.Now().Unix(),
		"model": req.Model, "data": data, "usage": usage{PromptTokens: n, TotalTokens: n}})
}

func (s *Server) pooling(w http.ResponseWriter, r *http.Request) {
	s.perInput(w, r, "Pooling API", "pool-", func(i int, t string) map[string]any {
		return map[string]any{"index": i, "object": "pooling", "data": embed(t)}
	})
}

func (s *Server) classify(w http.ResponseWriter, r *http.Request) {
	s.perInput(w, r, "Classification API", "classify-", func(i int, t string) map[string]any {
		p := float64(hashString(t)%1000) / 1000
		label := "LABEL_0"
		if p > 0.5 {
			label = "LABEL_1"
		}
		return map[string]any{"index": i, "label": label, "probs": []float64{1 - p, p}, "num_classes": 2}
	})
}

// responses serves POST /v1/responses: input as a string or messages,
// instructions, max_output_tokens, stream; the answer as vLLM's
// ResponsesResponse, streamed as the typed events of the Responses API.
func (s *Server) responses(w http.ResponseWriter, r *http.Request) {
	if s.cfg.pooling {
		writeError(w, 400, "BadRequestError", "The model does not support Responses API", nil)
		return
	}
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	var req struct {
		Model        string          `json:"model"`
		Input        json.RawMessage `json:"input"`
		Instructions string          `json:"instructions"`
		MaxOutput    *int            `json:"max_output_tokens"`
		Stream       bool            `json:"stream"`
		Temperature  *float64        `json:"temperature"`
		Store        *bool           `json:"store"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, 400, "BadRequestError", validationMessage(err), nil)
		return
	}
	if req.Model != s.cfg.served && req.Model != s.cfg.model {
		param := "model"
		writeError(w, 404, "NotFoundError", fmt.Sprintf("The model `%s` does not exist.", req.Model), &param)
		return
	}
	var text strings.Builder
	text.WriteString(req.Instructions)
	if in, ok := texts(req.Input); ok {
		text.WriteString(strings.Join(in, "\n"))
	} else {
		var msgs []chatMessage
		if json.Unmarshal(req.Input, &msgs) != nil || len(msgs) == 0 {
			param := "input"
			writeError(w, 400, "BadRequestError", "input must be a string or a list of input items", &param)
			return
		}
		for _, m := range msgs {
			t, _ := contentText(m.Content)
			text.WriteString("<|" + m.Role + "|>" + t + "\n")
		}
	}
	pt := countTokens(text.String())
	maxTokens := s.cfg.maxModelLen - pt
	if req.MaxOutput != nil {
		if *req.MaxOutput < 1 {
			param := "max_output_tokens"
			writeError(w, 400, "BadRequestError", fmt.Sprintf("max_output_tokens must be at least 1, got %d.", *req.MaxOutput), &param)
			return
		}
		maxTokens = min(maxTokens, *req.MaxOutput)
	}
	if maxTokens < 1 {
		writeError(w, 400, "BadRequestError", fmt.Sprintf("This model's maximum context length is %d tokens.", s.cfg.maxModelLen), nil)
		return
	}
	if s.deadErr() != nil {
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	seed := mrand.Uint64()
	if req.Temperature != nil && *req.Temperature == 0 {
		seed = hashString(text.String())
	}
	arrival := time.Now()
	er := &request{id: strconv.FormatUint(s.seq.Add(1), 10), prompt: pt, origPrompt: pt, maxTokens: maxTokens,
		natural: 16 + int(seed%240), seed: seed, arrival: arrival,
		out: make(chan token, maxTokens+2), ctx: r.Context()}
	eng, err := s.engineFor(r.Header.Get(rankHeader))
	if err != nil {
		writeError(w, 400, "BadRequestError", err.Error(), nil)
		return
	}
	er.tokens, er.hashes = eng.name(text.String())
	if err := eng.submit(er); err != nil {
		writeError(w, 500, "InternalServerError", err.Error(), nil)
		return
	}
	id := "resp_" + baseRequestID(r)
	msgID := fmt.Sprintf("msg_%016x", seed)
	resp := func(status string, out string, done bool) map[string]any {
		output := []any{}
		if done {
			output = append(output, map[string]any{"id": msgID, "type": "message", "role": "assistant", "status": "completed",
				"content": []any{map[string]any{"type": "output_text", "text": out, "annotations": []any{}, "logprobs": nil}}})
		}
		var u any
		if done {
			u = map[string]any{"input_tokens": pt, "input_tokens_details": map[string]int{"cached_tokens": 0},
				"output_tokens": er.emitted, "output_tokens_details": map[string]int{"reasoning_tokens": 0}, "total_tokens": pt + er.emitted}
		}
		return map[string]any{"id": id, "created_at": arrival.Unix(), "incomplete_details": nil, "instructions": nilIfEmpty(req.Instructions),
			"metadata": nil, "model": req.Model, "object": "response", "output": output, "parallel_tool_calls": true,
			"temperature": req.Temperature, "tool_choice": "auto", "tools": []any{}, "top_p": nil, "background": false,
			"max_output_tokens": req.MaxOutput, "previous_response_id": nil, "reasoning": nil, "service_tier": "auto",
			"status": status, "text": map[string]any{"format": map[string]string{"type": "text"}}, "truncation": "disabled",
			"usage": u, "user": nil}
	}
	if !req.Stream {
		var out strings.Builder
		for {
			select {
			case t := <-er.out:
				if t.err != nil {
					writeError(w, 500, "InternalServerError", t.err.Error(), nil)
					return
				}
				out.WriteString(t.text)
				if t.finish != "" {
					writeJSON(w, 200, resp("completed", out.String(), true))
					return
				}
			case <-r.Context().Done():
				return
			}
		}
	}
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.WriteHeader(200)
	n := 0
	event := func(typ string, v map[string]any) {
		v["type"] = typ
		v["sequence_number"] = n
		n++
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, b)
		if fl != nil {
			fl.Flush()
		}
	}
	event("response.created", map[string]any{"response": resp("in_progress", "", false)})
	event("response.in_progress", map[string]any{"response": resp("in_progress", "", false)})
	item := map[string]any{"id": msgID, "type": "message", "role": "assistant", "status": "in_progress", "content": []any{}}
	event("response.output_item.added", map[string]any{"output_index": 0, "item": item})
	part := map[string]any{"type": "output_text", "text": "", "annotations": []any{}, "logprobs": nil}
	event("response.content_part.added", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "part": part})
	var out strings.Builder
	for {
		select {
		case t := <-er.out:
			if t.err != nil {
				event("error", map[string]any{"code": "server_error", "message": t.err.Error(), "param": nil})
				return
			}
			if t.text != "" {
				out.WriteString(t.text)
				event("response.output_text.delta", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "delta": t.text, "logprobs": []any{}})
			}
			if t.finish == "" {
				continue
			}
			full := out.String()
			event("response.output_text.done", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "text": full, "logprobs": []any{}})
			done := map[string]any{"type": "output_text", "text": full, "annotations": []any{}, "logprobs": nil}
			event("response.content_part.done", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "part": done})
			event("response.output_item.done", map[string]any{"output_index": 0, "item": map[string]any{"id": msgID, "type": "message",
				"role": "assistant", "status": "completed", "content": []any{done}}})
			event("response.completed", map[string]any{"response": resp("completed", full, true)})
			return
		case <-r.Context().Done():
			return
		}
	}
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}
