package chaos

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/shoalhq/shoal/coordinator"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/spec"
)

// The coordinator API as a key-value register, checked for
// linearizability with porcupine: apply(name, value) puts, describe gets,
// delete deletes. A deployment's value is its model source; each key is a
// deployment no GPU of the cluster can host (it is stored, never placed).

// kvInput is one call.
type kvInput struct {
	op    string // put, get, del
	key   string
	value string // put
}

// kvOutput is what the call returned. unknown: a write that failed in a way
// that does not say whether it took effect (a timeout, a lost leader).
type kvOutput struct {
	value    string // get; "" when absent
	notFound bool   // del
	unknown  bool
}

// kvModel is a register per key; a write of unknown outcome may or may
// not have happened.
var kvModel = porcupine.NondeterministicModel{
	Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
		by := map[string][]porcupine.Operation{}
		var keys []string
		for _, o := range h {
			k := o.Input.(kvInput).key
			if _, ok := by[k]; !ok {
				keys = append(keys, k)
			}
			by[k] = append(by[k], o)
		}
		var out [][]porcupine.Operation
		for _, k := range keys {
			out = append(out, by[k])
		}
		return out
	},
	Init: func() []any { return []any{""} },
	Step: func(state, input, output any) []any {
		st, in, out := state.(string), input.(kvInput), output.(kvOutput)
		switch in.op {
		case "put":
			if out.unknown {
				return []any{in.value, st}
			}
			return []any{in.value}
		case "del":
			switch {
			case out.unknown:
				return []any{"", st}
			case out.notFound && st == "":
				return []any{""}
			case !out.notFound && st != "":
				return []any{""}
			}
			return nil
		case "get":
			if out.value == st {
				return []any{st}
			}
			return nil
		}
		return nil
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(kvInput), output.(kvOutput)
		switch {
		case out.unknown:
			return fmt.Sprintf("%s(%s %s) → ?", in.op, in.key, in.value)
		case in.op == "get":
			return fmt.Sprintf("get(%s) → %q", in.key, out.value)
		case in.op == "del":
			return fmt.Sprintf("del(%s) → notFound=%v", in.key, out.notFound)
		}
		return fmt.Sprintf("put(%s, %s)", in.key, in.value)
	},
}

// History records the calls of several clients.
type History struct {
	mu    sync.Mutex
	ops   []porcupine.Operation
	start time.Time
	// dropped: reads that failed, or were answered from a server's
	// unconfirmed last state (said so by coordinator.StaleHeader): they
	// claim nothing about the current state.
	dropped int
	errs    map[string]int // the writes' failures by message
}

// NewHistory starts an empty history.
func NewHistory() *History { return &History{start: time.Now()} }

func (h *History) add(client int, in kvInput, out kvOutput, call, ret time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := ret.Sub(h.start).Nanoseconds()
	if out.unknown {
		r = 1<<62 - 1 // it may take effect at any time after its call
	}
	h.ops = append(h.ops, porcupine.Operation{ClientId: client, Input: in, Output: out, Call: call.Sub(h.start).Nanoseconds(), Return: r})
}

// Check runs porcupine over the history.
func (h *History) Check(timeout time.Duration) (porcupine.CheckResult, int, int) {
	h.mu.Lock()
	ops := append([]porcupine.Operation(nil), h.ops...)
	dropped := h.dropped
	h.mu.Unlock()
	return porcupine.CheckOperationsTimeout(kvModel.ToModel(), ops, timeout), len(ops), dropped
}

// Writer runs clients of the coordinator API against random servers (a
// follower forwards writes and waits for the read index on reads) until
// ctx ends, recording every call.
type Writer struct {
	Conns []*grpc.ClientConn // one per server
	Keys  int
	Hist  *History
	// gpuModel no agent has: the keys are stored, never placed.
	GPUModel string
}

// Run drives n clients.
func (w *Writer) Run(ctx context.Context, n int, seed int64) {
	var wg sync.WaitGroup
	for c := 0; c < n; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed + int64(c)))
			for seq := 0; ctx.Err() == nil; seq++ {
				w.one(ctx, c, rng, seq)
				time.Sleep(time.Duration(20+rng.Intn(30)) * time.Millisecond)
			}
		}(c)
	}
	wg.Wait()
}

func (w *Writer) one(ctx context.Context, c int, rng *rand.Rand, seq int) {
	cl := coordv1.NewCoordinatorClient(w.Conns[rng.Intn(len(w.Conns))])
	key := fmt.Sprintf("lin-%d", rng.Intn(w.Keys))
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	call := time.Now()
	switch p := rng.Intn(10); {
	case p < 4:
		val := fmt.Sprintf("/models/c%d-%d", c, seq)
		// Scale traffic too: each put sets a replica count (1–4) as well.
		y := fmt.Sprintf("apiVersion: shoal/v1\nkind: Deployment\nname: %s\nmodel: {source: %s}\nengine: {kind: vllm, servedModelName: %s}\n"+
			"resources: {nodes: 1, gpusPerNode: 1, gpuModel: %s}\nreplicas: {count: %d}\n", key, val, key, w.GPUModel, 1+rng.Intn(4))
		_, err := cl.Apply(cctx, &coordv1.ApplyRequest{SpecYaml: []byte(y)})
		if ctx.Err() != nil {
			return // the test is ending: not an outcome
		}
		if w.Hist.refused(err) {
			return // refused before it was applied: no effect
		}
		w.Hist.add(c, kvInput{"put", key, val}, kvOutput{unknown: err != nil}, call, time.Now())
	case p < 6:
		_, err := cl.DeleteDeployment(cctx, &coordv1.DeleteDeploymentRequest{Name: key})
		if ctx.Err() != nil {
			return
		}
		if w.Hist.refused(err) {
			return
		}
		out := kvOutput{notFound: status.Code(err) == codes.NotFound}
		out.unknown = err != nil && !out.notFound
		w.Hist.add(c, kvInput{"del", key, ""}, out, call, time.Now())
	default:
		var md metadata.MD
		resp, err := cl.DescribeDeployment(cctx, &coordv1.DescribeDeploymentRequest{Name: key}, grpc.Header(&md))
		ret := time.Now()
		if ctx.Err() != nil {
			return
		}
		if len(md.Get(coordinator.StaleHeader)) > 0 || (err != nil && status.Code(err) != codes.NotFound) {
			w.Hist.mu.Lock()
			w.Hist.dropped++
			w.Hist.mu.Unlock()
			return
		}
		out := kvOutput{}
		if err == nil {
			d, perr := spec.Parse([]byte(resp.SpecYaml))
			if perr != nil {
				out.value = "unparsable: " + perr.Error()
			} else {
				out.value = d.Model.Source
			}
		}
		w.Hist.add(c, kvInput{"get", key, ""}, out, call, ret)
	}
}

// refused: the write failed before anything was applied; other failures
// are counted by message (the outcome is then unknown).
func (h *History) refused(err error) bool {
	if err == nil || status.Code(err) == codes.NotFound {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.errs == nil {
		h.errs = map[string]int{}
	}
	msg := status.Convert(err).Message()
	if i := strings.IndexAny(msg, "(:"); i > 0 {
		msg = msg[:i]
	}
	h.errs[msg]++
	return definitelyNot(err)
}

// Errors counts the writes' failures by the start of their message.
func (h *History) Errors() map[string]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]int{}
	for k, v := range h.errs {
		out[k] = v
	}
	return out
}

// definitelyNot: the write was refused before anything was applied: no
// leader to forward to, or the server was never reached (the dial failed:
// the request was not sent). Anything else may have taken effect.
func definitelyNot(err error) bool {
	st, _ := status.FromError(err)
	msg := st.Message()
	return st.Code() == codes.Unavailable && (strings.HasPrefix(msg, "no coordinator leader") ||
		strings.Contains(msg, "is not in this server's gossip yet") ||
		(strings.HasPrefix(msg, "connection error") && strings.Contains(msg, "while dialing")))
}

// Explain lists, for each key whose history is not linearizable, its calls
// in call order with their times (ms since the start) and outcomes.
func (h *History) Explain() string {
	h.mu.Lock()
	ops := append([]porcupine.Operation(nil), h.ops...)
	h.mu.Unlock()
	var b strings.Builder
	for _, part := range kvModel.Partition(ops) {
		if porcupine.CheckOperationsTimeout(kvModel.ToModel(), part, 10*time.Second) != porcupine.Illegal {
			continue
		}
		sort.Slice(part, func(i, j int) bool { return part[i].Call < part[j].Call })
		fmt.Fprintf(&b, "key %s: not linearizable\n", part[0].Input.(kvInput).key)
		for _, o := range part {
			ret := "∞"
			if o.Return < 1<<62-1 {
				ret = fmt.Sprintf("%.1f", float64(o.Return)/1e6)
			}
			fmt.Fprintf(&b, "  client %d %9.1f → %9s  %s\n", o.ClientId, float64(o.Call)/1e6, ret, kvModel.DescribeOperation(o.Input, o.Output))
		}
	}
	return b.String()
}

// Save writes the history as JSON lines (for a post-mortem).
func (h *History) Save(path string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var b strings.Builder
	for _, o := range h.ops {
		in, out := o.Input.(kvInput), o.Output.(kvOutput)
		fmt.Fprintf(&b, "{\"client\":%d,\"call\":%d,\"ret\":%d,\"op\":%q,\"key\":%q,\"value\":%q,\"got\":%q,\"notFound\":%v,\"unknown\":%v}\n",
			o.ClientId, o.Call, o.Return, in.op, in.key, in.value, out.value, out.notFound, out.unknown)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
