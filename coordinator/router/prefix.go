package router

import (
	"container/list"
	"encoding/binary"

	"github.com/shoalhq/shoal/internal/prefixhash"
)

// DefaultPrefixBytes is how much of a prompt the history-based prefix
// strategies hash unless --prefix-bytes says otherwise.
const DefaultPrefixBytes = 1024

// PrefixBlock is the prefix-hash block size in bytes (AIBrix's default: 128 characters).
const PrefixBlock = 128

// prefixHashes chains a hash over each full block of text[:limit].
func prefixHashes(text string, limit int) []uint64 { return prefixhash.Chain(text, PrefixBlock, limit) }

// prefixIndex remembers which backend saw which prefix block, bounded (LRU).
type prefixIndex struct{ l *lru }

func newPrefixIndex(max int) *prefixIndex { return &prefixIndex{l: newLRU(max)} }

func key(h uint64, addr string) string {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], h)
	return string(b[:]) + addr
}

func (x *prefixIndex) add(hs []uint64, addr string) {
	for _, h := range hs {
		x.l.put(key(h, addr), addr)
	}
}

// match is how many leading blocks addr has seen.
func (x *prefixIndex) match(hs []uint64, addr string) int {
	n := 0
	for _, h := range hs {
		if _, ok := x.l.get(key(h, addr)); !ok {
			break
		}
		n++
	}
	return n
}

// lru is a bounded string map that forgets the least recently used entry.
type lru struct {
	max int
	ll  *list.List
	m   map[string]*list.Element
}

type entry struct{ k, v string }

func newLRU(max int) *lru { return &lru{max: max, ll: list.New(), m: map[string]*list.Element{}} }

func (c *lru) get(k string) (string, bool) {
	e, ok := c.m[k]
	if !ok {
		return "", false
	}
	c.ll.MoveToFront(e)
	return e.Value.(*entry).v, true
}

func (c *lru) put(k, v string) {
	if e, ok := c.m[k]; ok {
		e.Value.(*entry).v = v
		c.ll.MoveToFront(e)
		return
	}
	c.m[k] = c.ll.PushFront(&entry{k, v})
	if c.ll.Len() > c.max {
		last := c.ll.Back()
		c.ll.Remove(last)
		delete(c.m, last.Value.(*entry).k)
	}
}
