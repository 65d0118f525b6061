package sim

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The completions and chat completions as vLLM answers them: n sequences
// per prompt, prompts as a string, a list of strings or token ids, echo,
// logprobs in both APIs' shapes, sampling seeded by `seed` or (temperature >
// 0, vLLM's default 1.0) by a random source, tool calls gated by
// --enable-auto-tool-choice --tool-call-parser, response_format producing
// JSON that matches the schema, and ids derived from X-Request-Id.

// baseRequestID is vLLM's _base_request_id: the client's X-Request-Id, else
// a random hex id.
func baseRequestID(r *http.Request) string {
	if id := r.Header.Get("X-Request-Id"); id != "" {
		return id
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// prompt is one prompt of a request: its text (for hashing, echo) and tokens.
type prompt struct {
	text   string
	tokens int
}

// parsePrompts reads a completions prompt: a string, a list of strings, a
// list of token ids or a list of such lists.
func parsePrompts(raw json.RawMessage) ([]prompt, error) {
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []prompt{{text: one, tokens: countTokens(one)}}, nil
	}
	var strs []string
	if json.Unmarshal(raw, &strs) == nil && len(strs) > 0 {
		out := make([]prompt, len(strs))
		for i, s := range strs {
			out[i] = prompt{text: s, tokens: countTokens(s)}
		}
		return out, nil
	}
	var ids []int
	if json.Unmarshal(raw, &ids) == nil && len(ids) > 0 {
		return []prompt{idsPrompt(ids)}, nil
	}
	var lists [][]int
	if json.Unmarshal(raw, &lists) == nil && len(lists) > 0 {
		out := make([]prompt, len(lists))
		for i, l := range lists {
			if len(l) == 0 {
				return nil, fmt.Errorf("please provide at least one prompt")
			}
			out[i] = idsPrompt(l)
		}
		return out, nil
	}
	return nil, fmt.Errorf("please provide at least one prompt")
}

func idsPrompt(ids []int) prompt { return prompt{text: detokenize(ids), tokens: len(ids)} }

// detokenize is the tokenizer stand-in's inverse: a word per token id.
func detokenize(ids []int) string {
	var b strings.Builder
	for _, id := range ids {
		b.WriteString(word(uint64(id), 0))
	}
	return b.String()
}

// seq is one generated sequence: choice index, its engine request and what
// the choice needs to be finished.
type seq struct {
	index  int
	p      prompt
	er     *request
	eng    *Engine
	tool   *toolDef // the tool this sequence calls, if any
	toolID string
	n      int // tokens the handler has received (the engine's own count is its goroutine's)
}

// toolMode reads tool_choice: "none", "auto", "required", or a named tool.
func toolMode(req genRequest) (mode string, named string, err error) {
	if len(req.Tools) == 0 {
		return "none", "", nil
	}
	if len(req.ToolChoice) == 0 || string(req.ToolChoice) == "null" {
		return "auto", "", nil // vLLM: tools without tool_choice mean "auto"
	}
	var s string
	if json.Unmarshal(req.ToolChoice, &s) == nil {
		switch s {
		case "none", "auto", "required":
			return s, "", nil
		}
		return "", "", fmt.Errorf("Invalid value for `tool_choice`: %s", s)
	}
	var n struct {
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if json.Unmarshal(req.ToolChoice, &n) != nil || n.Function.Name == "" {
		return "", "", fmt.Errorf("Invalid value for `tool_choice`")
	}
	for _, t := range req.Tools {
		if t.Function.Name == n.Function.Name {
			return "named", n.Function.Name, nil
		}
	}
	return "", "", fmt.Errorf("Tool '%s' has not been passed in `tools`.", n.Function.Name)
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request)        { s.generate(w, r, true) }
func (s *Server) completions(w http.ResponseWriter, r *http.Request) { s.generate(w, r, false) }

// logprobsAsked reads logprobs/top_logprobs: chat takes logprobs: true and
// top_logprobs 0-20, completions logprobs 0-20 (vLLM's max_logprobs).
func logprobsAsked(req genRequest, chat bool) (on bool, top int, err error) {
	raw := strings.TrimSpace(string(req.Logprobs))
	if chat {
		on = raw == "true"
		if raw != "" && raw != "null" && raw != "true" && raw != "false" {
			return false, 0, fmt.Errorf("[{'type': 'bool_type', 'loc': ('body', 'logprobs'), 'msg': 'Input should be a valid boolean'}]")
		}
		if req.TopLogprobs != nil {
			if !on {
				return false, 0, fmt.Errorf("when using `top_logprobs`, `logprobs` must be set to true.")
			}
			top = *req.TopLogprobs
		}
	} else if raw != "" && raw != "null" {
		n, perr := strconv.Atoi(raw)
		if perr != nil {
			return false, 0, fmt.Errorf("[{'type': 'int_type', 'loc': ('body', 'logprobs'), 'msg': 'Input should be a valid integer'}]")
		}
		on, top = true, n
	}
	if top < 0 || top > 20 {
		return false, 0, fmt.Errorf("Requested sample logprobs of %d, which is greater than max allowed: 20", top)
	}
	return on, top, nil
}

func (s *Server) generate(w http.ResponseWriter, r *http.Request, chat bool) {
	if s.cfg.pooling {
		api := "Completions API"
		if chat {
			api = "Chat Completions API"
		}
		writeError(w, 400, "BadRequestError", "The model does not support "+api, nil)
		return
	}
	arrival := time.Now()
	req, ok := s.decode(w, r)
	if !ok {
		return
	}
	bad := func(msg string, param ...string) {
		var p *string
		if len(param) > 0 {
			p = &param[0]
		}
		writeError(w, 400, "BadRequestError", msg, p)
	}
	if req.StreamOptions != nil && !req.Stream {
		bad("[{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, Stream options can only be defined when `stream=True`.'}]")
		return
	}
	n := 1
	if req.N != nil {
		if *req.N < 1 {
			bad(fmt.Sprintf("n must be at least 1, got %d.", *req.N), "n")
			return
		}
		n = *req.N
	}
	lpOn, lpTop, err := logprobsAsked(req, chat)
	if err != nil {
		bad(err.Error(), "logprobs")
		return
	}
	var prompts []prompt
	mode, named := "none", ""
	if chat {
		if len(req.Messages) == 0 {
			bad("messages: at least one message is required", "messages")
			return
		}
		text, err := chatTemplate(req.Messages)
		if err != nil {
			bad("messages: "+err.Error(), "messages")
			return
		}
		prompts = []prompt{{text: text, tokens: countTokens(text)}}
		if mode, named, err = toolMode(req); err != nil {
			bad(err.Error(), "tool_choice")
			return
		}
		if mode == "auto" && !(s.cfg.autoToolChoice && s.cfg.toolParser != "") {
			bad(`"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set`)
			return
		}
	} else {
		if prompts, err = parsePrompts(req.Prompt); err != nil {
			bad(err.Error(), "prompt")
			return
		}
	}
	var format map[string]any // a JSON schema the output must match; {} for json_object
	if rf := req.ResponseFormat; rf != nil {
		switch rf.Type {
		case "text", "":
		case "json_object":
			format = map[string]any{"type": "object"}
		case "json_schema":
			if rf.JSONSchema == nil || rf.JSONSchema.Schema == nil {
				bad("response_format json_schema needs json_schema.schema", "response_format")
				return
			}
			format = rf.JSONSchema.Schema
		default:
			bad(fmt.Sprintf("[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be 'text', 'json_object' or 'json_schema'\", 'input': '%s'}]", rf.Type), "response_format")
			return
		}
	}
	maxTokens := make([]int, len(prompts))
	if req.MaxCompTokens != nil {
		req.MaxTokens = req.MaxCompTokens
	}
	for i, p := range prompts {
		if p.tokens >= s.cfg.maxModelLen {
			bad(fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens in the messages, Please reduce the length of the messages.", s.cfg.maxModelLen, p.tokens))
			return
		}
		maxTokens[i] = s.cfg.maxModelLen - p.tokens
		if req.MaxTokens != nil {
			if *req.MaxTokens < 1 {
				bad(fmt.Sprintf("max_tokens must be at least 1, got %d.", *req.MaxTokens), "max_tokens")
				return
			}
			if p.tokens+*req.MaxTokens > s.cfg.maxModelLen {
				bad(fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the messages, %d in the completion). Please reduce the length of the messages or completion.", s.cfg.maxModelLen, p.tokens+*req.MaxTokens, p.tokens, *req.MaxTokens))
				return
			}
			maxTokens[i] = *req.MaxTokens
		}
	}
	if code, ok := s.injectedError(); ok {
		writeError(w, code, map[int]string{429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}[code], "injected fault", nil)
		return
	}
	if s.deadErr() != nil {
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	s.faults.mu.Lock()
	workerDead := s.faults.workerDead
	s.faults.mu.Unlock()
	if workerDead {
		// The first step after a Ray worker died raises ActorDiedError and kills the engine.
		go s.engines(func(e *Engine) {
			e.kill(fmt.Errorf("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task"))
		})
		writeError(w, 500, "InternalServerError", ErrEngineDead.Error(), nil)
		return
	}
	var stops []string
	if len(req.Stop) > 0 && string(req.Stop) != "null" {
		var one string
		if json.Unmarshal(req.Stop, &one) == nil {
			stops = []string{one}
		} else if err := json.Unmarshal(req.Stop, &stops); err != nil {
			bad("stop must be a string or a list of strings", "stop")
			return
		}
		for _, st := range stops {
			if st == "" {
				bad("stop strings must not be empty", "stop")
				return
			}
		}
	}
	base := baseRequestID(r)
	rid := "cmpl-" + base
	if chat {
		rid = "chatcmpl-" + base
	}
	kvt := req.KVTransferParams
	pulled := false
	if s.sgl != nil {
		// SGLang's disaggregation: both engines need the room.
		if req.BootstrapRoom == nil || req.BootstrapHost == "" || req.BootstrapPort == 0 {
			bad(fmt.Sprintf("disaggregation mode %s needs bootstrap_host, bootstrap_port and bootstrap_room (a PD router sends them)", s.sgl.cfg.mode))
			return
		}
		room := *req.BootstrapRoom
		switch {
		case req.BootstrapHost == fakeBootstrapHost:
			// SGLang's FAKE_BOOTSTRAP_HOST (its warm-up's): no peer, no KV moves.
		case s.sgl.cfg.mode == "prefill":
			// P computes the prompt (and one token) and answers whole.
			for i := range maxTokens {
				maxTokens[i] = 1
			}
			req.Stream = false
			defer s.sgl.abandon(room, fmt.Errorf("the prefill engine's request for bootstrap_room %d ended before it had the KV", room))
		default: // decode
			total := 0
			for _, p := range prompts {
				total += p.tokens
			}
			if _, err := s.sgl.receive(r.Context(), req.BootstrapHost, req.BootstrapPort, room, total); err != nil {
				if r.Context().Err() != nil {
					return
				}
				writeError(w, 500, "InternalServerError", err.Error(), nil)
				return
			}
			pulled = true
		}
	}
	if s.nixl != nil && kvt != nil && kvt.DoRemotePrefill {
		// D: the prompt's KV is on the prefill engine; pull it first.
		total := 0
		for _, p := range prompts {
			total += p.tokens
		}
		if _, err := s.nixl.pull(r.Context(), kvt, total); err != nil {
			if r.Context().Err() != nil {
				return
			}
			if s.nixl.cfg.FailurePolicy == "fail" {
				writeError(w, 500, "InternalServerError", "Failed to load KV cache from the remote prefill engine (kv_load_failure_policy=fail): "+err.Error(), nil)
				return
			}
			// recompute: prefill here instead.
		} else {
			pulled = true
		}
	}
	var seqs []*seq
	for pi, p := range prompts {
		for k := 0; k < n; k++ {
			// Sampling: a seed makes it repeatable; temperature 0 is greedy
			// (the prompt decides); otherwise (vLLM's default temperature is
			// 1.0) every request draws anew.
			var seed uint64
			switch {
			case req.Seed != nil:
				seed = uint64(*req.Seed) + uint64(k)*0x9E3779B97F4A7C15
			case req.Temperature != nil && *req.Temperature == 0:
				seed = hashString(p.text)
			default:
				seed = mrand.Uint64()
			}
			sq := &seq{index: pi*n + k, p: p}
			var script []string
			switch {
			case mode == "auto" || mode == "required" || mode == "named":
				t := req.Tools[0]
				if named != "" {
					for i := range req.Tools {
						if req.Tools[i].Function.Name == named {
							t = req.Tools[i]
						}
					}
				}
				sq.tool = &t
				sq.toolID = fmt.Sprintf("chatcmpl-tool-%016x", seed)
				script = pieces(instance(t.Function.Parameters, seed))
			case format != nil:
				script = pieces(instance(format, seed))
			}
			er := &request{id: strconv.FormatUint(s.seq.Add(1), 10), prompt: p.tokens, origPrompt: p.tokens, maxTokens: maxTokens[pi],
				natural: 16 + int(seed%240), ignoreEOS: req.IgnoreEOS, seed: seed, arrival: arrival,
				stops: stops, script: script, lora: s.adapterOf(req.Model),
				out: make(chan token, maxTokens[pi]+2), ctx: r.Context()}
			if script != nil {
				er.natural, er.ignoreEOS = len(script), false
			}
			eng, err := s.engineFor(r.Header.Get(rankHeader))
			if err != nil {
				writeError(w, 400, "BadRequestError", err.Error(), nil)
				return
			}
			er.tokens, er.hashes = eng.name(p.text)
			if pulled {
				inject(eng, er)
			}
			if err := eng.submit(er); err != nil {
				writeError(w, 500, "InternalServerError", err.Error(), nil)
				return
			}
			sq.er, sq.eng = er, eng
			seqs = append(seqs, sq)
		}
	}
	o := output{chat: chat, rid: rid, created: arrival.Unix(), model: req.Model, logprobs: lpOn, top: lpTop, echo: req.Echo && !chat, toolMode: mode}
	if req.Stream {
		s.stream(w, r.Context(), seqs, o, req.StreamOptions != nil && req.StreamOptions.IncludeUsage)
		return
	}
	choices := make([]choice, len(seqs))
	u := usage{}
	counted := map[int]bool{}
	for _, sq := range seqs {
		var text strings.Builder
		var lps []tokLogprob
		finish := ""
		var stopReason *string
		for finish == "" {
			select {
			case t := <-sq.er.out:
				if t.err != nil {
					writeError(w, 500, "InternalServerError", t.err.Error(), nil)
					return
				}
				text.WriteString(t.text)
				if lpOn && t.text != "" {
					sq.n++
					lps = append(lps, tokLogprobOf(t.text, sq.er.seed, sq.n, lpTop))
				}
				finish = t.finish
				if t.stop != "" {
					stopReason = &t.stop
				}
			case <-r.Context().Done():
				return
			}
		}
		pi := sq.index / n
		if !counted[pi] {
			counted[pi] = true
			u.PromptTokens += sq.p.tokens
		}
		u.CompletionTokens += sq.er.emitted
		choices[sq.index] = o.choice(sq, text.String(), lps, finish, stopReason)
	}
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	obj := "text_completion"
	if chat {
		obj = "chat.completion"
	}
	resp := completion{ID: rid, Object: obj, Created: arrival.Unix(), Model: req.Model, Choices: choices, Usage: u}
	if s.nixl != nil && kvt != nil && kvt.DoRemoteDecode && len(seqs) > 0 {
		// P: keep the prompt's KV for the decode engine.
		resp.KVTransferParams = s.nixl.hold(seqs[0].eng, seqs[0].er, rid)
	}
	if s.sgl != nil && s.sgl.cfg.mode == "prefill" && req.BootstrapHost != fakeBootstrapHost && len(seqs) > 0 {
		// P: hand the prompt's KV to the room's decode engine, then answer.
		if err := s.sgl.handOver(r.Context(), *req.BootstrapRoom, seqs[0].eng, seqs[0].er); err != nil {
			if r.Context().Err() == nil {
				writeError(w, 500, "InternalServerError", err.Error(), nil)
			}
			return
		}
	}
	writeJSON(w, 200, resp)
}

// output is what every choice of a response shares.
type output struct {
	chat       bool
	rid, model string
	created    int64
	logprobs   bool
	top        int
	echo       bool
	toolMode   string
}

// choice is a whole (non-streamed) choice in vLLM's shape and field order.
func (o output) choice(sq *seq, text string, lps []tokLogprob, finish string, stopReason *string) choice {
	c := choice{Index: sq.index, FinishReason: finish, StopReason: stopReason}
	if o.chat {
		msg := &message{Role: "assistant", Content: &text, ToolCalls: []toolCall{}}
		if sq.tool != nil {
			msg.Content = nil
			tc := toolCall{ID: sq.toolID, Type: "function"}
			tc.Function.Name, tc.Function.Arguments = sq.tool.Function.Name, text
			msg.ToolCalls = []toolCall{tc}
			if o.toolMode == "auto" || o.toolMode == "required" {
				c.FinishReason = "tool_calls"
			}
		}
		c.Message = msg
		if o.logprobs {
			c.Logprobs = map[string]any{"content": chatLogprobs(lps)}
		}
		return c
	}
	if o.logprobs {
		c.Logprobs = completionLogprobs(lps, 0)
	}
	if o.echo {
		text = sq.p.text + text
	}
	c.Text = &text
	return c
}

// tokLogprob is one sampled token with its log-probability and the top alternatives.
type tokLogprob struct {
	token string
	lp    float64
	top   []tokLogprob
}

func tokLogprobOf(text string, seed uint64, n, top int) tokLogprob {
	h := hashString(text) ^ seed ^ uint64(n)
	t := tokLogprob{token: text, lp: -float64(h%4000) / 1000}
	for i := 0; i < top; i++ {
		alt := text
		lp := t.lp
		if i > 0 {
			alt = word(h, i)
			lp = t.lp - float64(i)*0.7 - float64((h>>uint(i))%500)/1000
		}
		t.top = append(t.top, tokLogprob{token: alt, lp: lp})
	}
	return t
}

func tokenBytes(s string) []int {
	b := make([]int, len(s))
	for i := range s {
		b[i] = int(s[i])
	}
	return b
}

// chatLogprobs is the chat API's logprobs.content list.
func chatLogprobs(lps []tokLogprob) []any {
	out := make([]any, 0, len(lps))
	for _, t := range lps {
		top := make([]any, 0, len(t.top))
		for _, a := range t.top {
			top = append(top, map[string]any{"token": a.token, "logprob": a.lp, "bytes": tokenBytes(a.token)})
		}
		out = append(out, map[string]any{"token": t.token, "logprob": t.lp, "bytes": tokenBytes(t.token), "top_logprobs": top})
	}
	return out
}

// completionLogprobs is the completions API's logprobs object.
func completionLogprobs(lps []tokLogprob, offset int) map[string]any {
	offsets, tokens, lpList, tops := []int{}, []string{}, []float64{}, []any{}
	for _, t := range lps {
		offsets = append(offsets, offset)
		offset += len(t.token)
		tokens = append(tokens, t.token)
		lpList = append(lpList, t.lp)
		m := map[string]float64{}
		for _, a := range t.top {
			m[a.token] = a.lp
		}
		tops = append(tops, m)
	}
	return map[string]any{"text_offset": offsets, "token_logprobs": lpList, "tokens": tokens, "top_logprobs": tops}
}

// stream sends the sequences' tokens as vLLM's SSE chunks, interleaved as
// they come; [DONE] after the last.
func (s *Server) stream(w http.ResponseWriter, ctx context.Context, seqs []*seq, o output, usageOn bool) {
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.WriteHeader(200)
	send := func(v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "data: %s\n\n", b)
		if fl != nil {
			fl.Flush()
		}
	}
	obj := "text_completion"
	if o.chat {
		obj = "chat.completion.chunk"
	}
	head := func(choices any) chunk {
		return chunk{ID: o.rid, Object: obj, Created: o.created, Model: o.model, Choices: choices}
	}
	for _, sq := range seqs {
		switch {
		case o.chat:
			empty := ""
			d := &delta{Role: "assistant", Content: &empty}
			if sq.tool != nil {
				d.Content = nil
			}
			send(head([]chunkChoice{{Index: sq.index, Delta: d}}))
			if sq.tool != nil {
				tc := toolCallDelta{ID: sq.toolID, Type: "function"}
				tc.Function.Name = sq.tool.Function.Name
				send(head([]chunkChoice{{Index: sq.index, Delta: &delta{ToolCalls: []toolCallDelta{tc}}}}))
			}
		case o.echo:
			text := sq.p.text
			send(head([]chunkChoice{{Index: sq.index, Text: &text}}))
		}
	}
	type item struct {
		sq *seq
		t  token
	}
	merged := make(chan item)
	done := make(chan struct{})
	defer close(done)
	for _, sq := range seqs {
		go func() {
			for {
				select {
				case t := <-sq.er.out:
					select {
					case merged <- item{sq, t}:
					case <-done:
						return
					}
					if t.err != nil || t.finish != "" {
						return
					}
				case <-done:
					return
				}
			}
		}()
	}
	left := len(seqs)
	offsets := map[int]int{}
	for left > 0 {
		select {
		case it := <-merged:
			sq, t := it.sq, it.t
			if t.err != nil {
				send(map[string]any{"error": map[string]any{"message": t.err.Error(), "type": "InternalServerError", "param": nil, "code": 500}})
				fmt.Fprint(w, "data: [DONE]\n\n")
				return
			}
			var lp any
			if o.logprobs && t.text != "" {
				sq.n++
				tl := tokLogprobOf(t.text, sq.er.seed, sq.n, o.top)
				if o.chat {
					lp = map[string]any{"content": chatLogprobs([]tokLogprob{tl})}
				} else {
					lp = completionLogprobs([]tokLogprob{tl}, offsets[sq.index])
					offsets[sq.index] += len(t.text)
				}
			}
			text := t.text
			var d *delta
			var tx *string
			switch {
			case o.chat && sq.tool != nil:
				tc := toolCallDelta{}
				tc.Function.Arguments = text
				d = &delta{ToolCalls: []toolCallDelta{tc}}
			case o.chat:
				d = &delta{Content: &text}
			default:
				tx = &text
			}
			if t.finish == "" {
				send(head([]chunkChoice{{Index: sq.index, Delta: d, Text: tx, Logprobs: lp}}))
				continue
			}
			finish := t.finish
			if sq.tool != nil && (o.toolMode == "auto" || o.toolMode == "required") {
				finish = "tool_calls"
			}
			var sr *string
			if t.stop != "" {
				sr = &t.stop
			}
			left--
			send(head([]finalChoice{{Index: sq.index, Delta: d, Text: tx, Logprobs: lp, FinishReason: finish, StopReason: sr}}))
		case <-ctx.Done():
			return
		}
	}
	if usageOn {
		u := usage{}
		counted := map[string]bool{}
		for _, sq := range seqs {
			if !counted[sq.p.text] {
				counted[sq.p.text] = true
				u.PromptTokens += sq.p.tokens
			}
			u.CompletionTokens += sq.er.emitted
		}
		u.TotalTokens = u.PromptTokens + u.CompletionTokens
		c := head([]struct{}{})
		c.Usage = &u
		send(c)
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	if fl != nil {
		fl.Flush()
	}
}

// instance is a JSON value matching a (simple) JSON schema, seeded: objects
// with their properties (required ones at least), strings, numbers,
// integers, booleans, arrays, enums, consts.
func instance(schema map[string]any, seed uint64) string {
	b, _ := json.Marshal(value(schema, seed, 0))
	return string(b)
}

func value(schema map[string]any, seed uint64, depth int) any {
	if c, ok := schema["const"]; ok {
		return c
	}
	if e, ok := schema["enum"].([]any); ok && len(e) > 0 {
		return e[seed%uint64(len(e))]
	}
	for _, k := range []string{"anyOf", "oneOf"} {
		if alts, ok := schema[k].([]any); ok && len(alts) > 0 {
			if m, ok := alts[0].(map[string]any); ok {
				return value(m, seed, depth+1)
			}
		}
	}
	typ, _ := schema["type"].(string)
	if ts, ok := schema["type"].([]any); ok && len(ts) > 0 {
		typ, _ = ts[0].(string)
	}
	if typ == "" {
		if _, ok := schema["properties"]; ok {
			typ = "object"
		}
	}
	switch typ {
	case "object":
		out := map[string]any{}
		props, _ := schema["properties"].(map[string]any)
		names := make([]string, 0, len(props))
		for n := range props {
			names = append(names, n)
		}
		sort.Strings(names)
		for i, n := range names {
			if depth > 6 {
				break
			}
			if m, ok := props[n].(map[string]any); ok {
				out[n] = value(m, seed+uint64(i)*7919, depth+1)
			}
		}
		if len(props) == 0 {
			out["answer"] = strings.TrimSpace(word(seed, 1) + word(seed, 2))
		}
		return out
	case "array":
		items, _ := schema["items"].(map[string]any)
		n := 1 + int(seed%3)
		if m, ok := schema["minItems"].(float64); ok && n < int(m) {
			n = int(m)
		}
		if m, ok := schema["maxItems"].(float64); ok && n > int(m) {
			n = int(m)
		}
		out := make([]any, 0, n)
		for i := 0; i < n && depth <= 6; i++ {
			out = append(out, value(items, seed+uint64(i)*104729, depth+1))
		}
		return out
	case "integer":
		lo, hi := 0.0, 100.0
		if m, ok := schema["minimum"].(float64); ok {
			lo = m
		}
		if m, ok := schema["maximum"].(float64); ok {
			hi = m
		}
		return int64(lo) + int64(seed%uint64(math.Max(1, hi-lo+1)))
	case "number":
		return float64(seed%10000) / 100
	case "boolean":
		return seed%2 == 0
	case "null":
		return nil
	default:
		return strings.TrimSpace(word(seed, 1) + word(seed, 2))
	}
}

// pieces splits text into tokens of about 4 characters (the tokenizer
// stand-in), so a scripted output streams like generated text.
func pieces(s string) []string {
	var out []string
	for len(s) > 4 {
		out = append(out, s[:4])
		s = s[4:]
	}
	if s != "" {
		out = append(out, s)
	}
	return out
}
