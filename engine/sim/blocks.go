package sim

import (
	"container/list"
)

// blocks is the KV cache: fixed-size blocks, reference-counted. Full prompt
// blocks are identified by a hash chained over every block before them, so two
// prompts share cached blocks exactly as far as their text is identical from
// the start (vLLM's automatic prefix caching). A block nobody references stays
// cached and counts as free; it sits in an LRU list and is evicted, oldest
// first, only when a fresh block is needed.
type blocks struct {
	total  int
	refs   []int
	hash   []uint64       // 0 when the block holds no cached content
	cached map[uint64]int // hash → block
	lru    *list.List     // zero-ref cached blocks, least recently used first
	inLRU  map[int]*list.Element
	free   []int // zero-ref uncached blocks
	used   int   // blocks with refs > 0
	// onEvict, when set, hears each cached block evicted (a BlockRemoved).
	onEvict func(h uint64)
}

func newBlocks(total int) *blocks {
	b := &blocks{total: total, refs: make([]int, total), hash: make([]uint64, total), cached: map[uint64]int{},
		lru: list.New(), inLRU: map[int]*list.Element{}}
	for i := total - 1; i >= 0; i-- {
		b.free = append(b.free, i)
	}
	return b
}

// available counts blocks that can be handed out: free plus evictable.
func (b *blocks) available() int { return len(b.free) + b.lru.Len() }

// usage is the fraction of blocks in use (vllm:kv_cache_usage_perc).
func (b *blocks) usage() float64 { return float64(b.used) / float64(b.total) }

// alloc hands out a fresh block, evicting the least recently used cached one
// when no uncached block is free. The caller checked available().
func (b *blocks) alloc() int {
	var id int
	if n := len(b.free); n > 0 {
		id = b.free[n-1]
		b.free = b.free[:n-1]
	} else {
		e := b.lru.Front()
		id = e.Value.(int)
		b.lru.Remove(e)
		delete(b.inLRU, id)
		delete(b.cached, b.hash[id])
		if b.onEvict != nil {
			b.onEvict(b.hash[id])
		}
		b.hash[id] = 0
	}
	b.refs[id] = 1
	b.used++
	return id
}

// acquire takes a reference on a cached block (a prefix-cache hit).
func (b *blocks) acquire(id int) {
	if b.refs[id] == 0 {
		if e, ok := b.inLRU[id]; ok {
			b.lru.Remove(e)
			delete(b.inLRU, id)
		}
		b.used++
	}
	b.refs[id]++
}

// release drops a reference; an unreferenced block stays cached if it has content.
func (b *blocks) release(id int) {
	b.refs[id]--
	if b.refs[id] > 0 {
		return
	}
	b.used--
	if b.hash[id] != 0 {
		b.inLRU[id] = b.lru.PushBack(id)
		return
	}
	b.free = append(b.free, id)
}

// register records that block id now holds the content named by h, and says
// whether that content is newly cached.
func (b *blocks) register(id int, h uint64) bool {
	if _, ok := b.cached[h]; ok || b.hash[id] != 0 {
		return false // same content already cached elsewhere: keep one copy
	}
	b.hash[id] = h
	b.cached[h] = id
	return true
}

// clear forgets every cached block that nobody holds (vLLM's
// reset_prefix_cache, which then publishes AllBlocksCleared).
func (b *blocks) clear() {
	for e := b.lru.Front(); e != nil; e = e.Next() {
		id := e.Value.(int)
		delete(b.cached, b.hash[id])
		b.hash[id] = 0
		b.free = append(b.free, id)
	}
	b.lru.Init()
	b.inLRU = map[int]*list.Element{}
}

// lookup returns the cached blocks for the longest cached prefix of hashes.
func (b *blocks) lookup(hashes []uint64) []int {
	var out []int
	for _, h := range hashes {
		id, ok := b.cached[h]
		if !ok {
			break
		}
		out = append(out, id)
	}
	return out
}

// tokenIDs is the tokenizer stand-in: a token for each 4 bytes of text, its
// id a hash of those bytes in a 128k vocabulary. /tokenize answers with it and
// the KV cache names blocks from it.
func tokenIDs(text string) []uint32 {
	n := countTokens(text)
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(hashString(text[min(i*4, len(text)):min(i*4+4, len(text))]) % 128000)
	}
	return out
}

// Tokenize is the simulator's tokenizer (what its /tokenize returns), for
// in-process callers such as the routing benchmark.
func Tokenize(text string) []uint32 { return tokenIDs(text) }
