package chaos

import (
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// TestLinearizabilityModel: the checker the chaos suite relies on accepts
// linearizable histories and rejects the anomalies a replicated store can
// show (a stale read after an acknowledged write, a lost write, a
// resurrected delete), and lets a write of unknown outcome go either way.
func TestLinearizabilityModel(t *testing.T) {
	at := func(ms int) time.Time { return time.Unix(1000, 0).Add(time.Duration(ms) * time.Millisecond) }
	type op struct {
		client    int
		in        kvInput
		out       kvOutput
		call, ret int
	}
	for _, tc := range []struct {
		name string
		ops  []op
		ok   bool
	}{
		{"put then get", []op{{0, kvInput{"put", "a", "1"}, kvOutput{}, 0, 10}, {1, kvInput{"get", "a", ""}, kvOutput{value: "1"}, 20, 30}}, true},
		{"stale read after an acknowledged put", []op{{0, kvInput{"put", "a", "1"}, kvOutput{}, 0, 10}, {1, kvInput{"get", "a", ""}, kvOutput{value: ""}, 20, 30}}, false},
		{"concurrent get may see either", []op{{0, kvInput{"put", "a", "1"}, kvOutput{}, 0, 30}, {1, kvInput{"get", "a", ""}, kvOutput{value: ""}, 10, 20}}, true},
		{"lost write", []op{{0, kvInput{"put", "a", "1"}, kvOutput{}, 0, 10}, {0, kvInput{"put", "a", "2"}, kvOutput{}, 20, 30},
			{1, kvInput{"get", "a", ""}, kvOutput{value: "1"}, 40, 50}}, false},
		{"resurrected delete", []op{{0, kvInput{"put", "a", "1"}, kvOutput{}, 0, 10}, {0, kvInput{"del", "a", ""}, kvOutput{}, 20, 30},
			{1, kvInput{"get", "a", ""}, kvOutput{value: "1"}, 40, 50}}, false},
		{"delete of nothing says not found", []op{{0, kvInput{"del", "a", ""}, kvOutput{notFound: true}, 0, 10}}, true},
		{"delete of nothing that says it deleted", []op{{0, kvInput{"del", "a", ""}, kvOutput{}, 0, 10}}, false},
		{"unknown write seen", []op{{0, kvInput{"put", "a", "1"}, kvOutput{unknown: true}, 0, 10}, {1, kvInput{"get", "a", ""}, kvOutput{value: "1"}, 20, 30}}, true},
		{"unknown write not seen", []op{{0, kvInput{"put", "a", "1"}, kvOutput{unknown: true}, 0, 10}, {1, kvInput{"get", "a", ""}, kvOutput{value: ""}, 20, 30}}, true},
		{"keys are separate", []op{{0, kvInput{"put", "a", "1"}, kvOutput{}, 0, 10}, {1, kvInput{"get", "b", ""}, kvOutput{value: ""}, 20, 30}}, true},
	} {
		h := &History{start: at(0)}
		for _, o := range tc.ops {
			h.add(o.client, o.in, o.out, at(o.call), at(o.ret))
		}
		res, n, _ := h.Check(5 * time.Second)
		if got := res == porcupine.Ok; got != tc.ok || n != len(tc.ops) {
			t.Errorf("%s: linearizable=%v (%v), want %v", tc.name, got, res, tc.ok)
		}
	}
}
