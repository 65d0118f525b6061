package adapters

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestDecide(t *testing.T) {
	now := time.Unix(1000, 0)
	ago := func(s int) time.Time { return now.Add(-time.Duration(s) * time.Second) }
	loaded := func(n string, used int) Entry {
		return Entry{Name: n, State: Loaded, InSpec: true, LastUsed: ago(used)}
	}
	for _, tc := range []struct {
		name  string
		es    []Entry
		slots int
		want  Action
	}{
		{"nothing to do", []Entry{loaded("a", 1)}, 2, Action{}},
		{"a pinned adapter loads", []Entry{{Name: "a", InSpec: true, Pinned: true, State: Pending}}, 2, Action{Kind: "load", Name: "a"}},
		{"an unpinned one waits", []Entry{{Name: "a", InSpec: true}}, 2, Action{}},
		{"removed from the catalog: unloaded first", []Entry{{Name: "a", InSpec: true, Pinned: true}, {Name: "b", State: Loaded}}, 2, Action{Kind: "unload", Name: "b"}},
		{"dropped: unloaded", []Entry{{Name: "a", State: Loaded, InSpec: true, Dropped: true}}, 2, Action{Kind: "unload", Name: "a"}},
		{"asked beats pinned", []Entry{{Name: "a", InSpec: true, Pinned: true}, {Name: "b", InSpec: true, Asked: ago(1)}}, 2, Action{Kind: "load", Name: "b"}},
		{"pinned beats warm", []Entry{{Name: "a", InSpec: true, Warm: true}, {Name: "b", InSpec: true, Pinned: true}}, 2, Action{Kind: "load", Name: "b"}},
		{"full: the least recently used goes", []Entry{loaded("a", 10), loaded("b", 50), {Name: "c", InSpec: true, Asked: ago(1)}}, 2,
			Action{Kind: "evict", Name: "c", Victim: "b"}},
		{"pinned and busy adapters stay", []Entry{{Name: "a", State: Loaded, InSpec: true, Pinned: true, LastUsed: ago(99)},
			{Name: "b", State: Loaded, InSpec: true, Busy: true, LastUsed: ago(98)}, loaded("d", 5), {Name: "c", InSpec: true, Pinned: true}}, 3,
			Action{Kind: "evict", Name: "c", Victim: "d"}},
		{"no room at all: the ask is refused", []Entry{{Name: "a", State: Loaded, InSpec: true, Pinned: true}, {Name: "c", InSpec: true, Asked: ago(1)}}, 1,
			Action{Refuse: []string{"c"}}},
		{"warm never evicts", []Entry{loaded("a", 10), {Name: "w", InSpec: true, Warm: true}}, 1, Action{}},
		{"warm fills a free slot", []Entry{loaded("a", 10), {Name: "w", InSpec: true, Warm: true}}, 2, Action{Kind: "load", Name: "w"}},
		{"a failure waits its backoff", []Entry{{Name: "a", InSpec: true, Pinned: true, State: Failed, Fails: 1, RetryAt: now.Add(5 * time.Second)}}, 2,
			Action{Wake: now.Add(5 * time.Second)}},
		{"past its backoff it is tried again", []Entry{{Name: "a", InSpec: true, Pinned: true, State: Failed, Fails: 2, RetryAt: ago(1)}}, 2,
			Action{Kind: "load", Name: "a"}},
		{"after the last attempt it stays failed", []Entry{{Name: "a", InSpec: true, Pinned: true, State: Failed, Fails: MaxAttempts}}, 2, Action{}},
		{"unless a router asks for it", []Entry{{Name: "a", InSpec: true, State: Failed, Fails: MaxAttempts, Asked: ago(1)}}, 2, Action{Kind: "load", Name: "a"}},
		{"a failed unload waits", []Entry{{Name: "a", State: Loaded, RetryAt: now.Add(time.Second)}}, 2, Action{Wake: now.Add(time.Second)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, Decide(tc.es, tc.slots, now))
		})
	}
}

func TestBackoff(t *testing.T) {
	require.Equal(t, []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 80 * time.Second},
		[]time.Duration{Backoff(1), Backoff(2), Backoff(3), Backoff(4), Backoff(5), Backoff(9)})
}
