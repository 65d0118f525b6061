// Package kvhash names KV-cache blocks the way the engines do, so that a
// router can hash a new prompt's tokens and find the replicas whose engines
// reported storing those blocks.
//
// vLLM (prefix caching with --prefix-caching-hash-algo sha256_cbor) chains
// SHA-256 over the canonical CBOR of the tuple
//
//	(parent_block_hash, tuple(block_token_ids), extra_keys)
//
// where the first block's parent is NONE_HASH = sha256(cbor(PYTHONHASHSEED)),
// extra_keys is None for a plain text prompt or (lora_name,) under an
// adapter, and only full blocks of block_size tokens are hashed. Its KV events
// carry each hash as an integer: the digest's last eight bytes read big-endian
// (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, on by default).
//
// SGLang (its radix cache with --page-size N and --kv-events-config) chains
// SHA-256 over pages: a page's digest is sha256(the previous page's digest,
// then each token as 4 bytes little-endian), the first page having no
// previous digest (RadixKey.hash_page), and its events carry the digest's
// first eight bytes as a signed 64-bit integer (hash_str_to_int64). Only
// full pages are cached. No seed is involved.
package kvhash

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
)

// AlgoSHA256CBOR is vLLM's --prefix-caching-hash-algo sha256_cbor, the one
// vLLM rule a router can compute.
const AlgoSHA256CBOR = "sha256_cbor"

// AlgoSGLangPage is SGLang's page chain. SGLang has no flag naming it; this
// is the name shoal's heads report it by.
const AlgoSGLangPage = "sglang_page_sha256"

// Namer hashes token blocks as one engine's prefix cache does. It is
// comparable: two replicas with the same rule, seed and block size have
// equal namers, and a prompt's names are computed once for both.
type Namer struct {
	Algo      string
	BlockSize int
	none      [32]byte // vLLM's NONE_HASH
}

// NewVLLM returns the hasher for an engine started with PYTHONHASHSEED=seed
// and --block-size blockSize. vLLM reads the seed as a string; shoal always
// sets one, since without it NONE_HASH is random per process and no two
// replicas (nor a router) could agree on a block's name.
func NewVLLM(seed string, blockSize int) (*Namer, error) {
	if blockSize <= 0 {
		return nil, fmt.Errorf("block size must be positive, not %d", blockSize)
	}
	if seed == "" {
		return nil, errors.New("hash seed is empty: the engine's NONE_HASH would be random (set PYTHONHASHSEED)")
	}
	h := &Namer{Algo: AlgoSHA256CBOR, BlockSize: blockSize}
	h.none = sha256.Sum256(appendText(nil, seed))
	return h, nil
}

// NewSGLang returns the namer for an SGLang engine started with
// --page-size pageSize.
func NewSGLang(pageSize int) (*Namer, error) {
	if pageSize <= 0 {
		return nil, fmt.Errorf("page size must be positive, not %d", pageSize)
	}
	return &Namer{Algo: AlgoSGLangPage, BlockSize: pageSize}, nil
}

// NoneHash is vLLM's NONE_HASH, the parent of a prompt's first block.
func (h *Namer) NoneHash() [32]byte { return h.none }

// Digests returns the full SHA-256 digest of each full block of tokens, in
// order, each chained over the ones before. lora, when not empty, is the
// adapter's name (vLLM's extra key for every block under a LoRA request).
// SGLang's rule names no adapter's blocks (its namespacing of them has
// changed between releases): nil.
func (h *Namer) Digests(tokens []uint32, lora string) [][32]byte {
	if h.Algo == AlgoSGLangPage {
		return h.pages(tokens, lora)
	}
	n := len(tokens) / h.BlockSize
	out := make([][32]byte, 0, n)
	parent := h.none
	buf := make([]byte, 0, 64+5*h.BlockSize+len(lora))
	for i := 0; i < n; i++ {
		buf = appendBlock(buf[:0], parent, tokens[i*h.BlockSize:(i+1)*h.BlockSize], lora)
		parent = sha256.Sum256(buf)
		out = append(out, parent)
	}
	return out
}

// pages is SGLang's chain over the full pages of tokens.
func (h *Namer) pages(tokens []uint32, lora string) [][32]byte {
	if lora != "" {
		return nil
	}
	n := len(tokens) / h.BlockSize
	out := make([][32]byte, 0, n)
	buf := make([]byte, 0, 32+4*h.BlockSize)
	for i := 0; i < n; i++ {
		buf = buf[:0]
		if i > 0 {
			buf = append(buf, out[i-1][:]...)
		}
		for _, t := range tokens[i*h.BlockSize : (i+1)*h.BlockSize] {
			buf = binary.LittleEndian.AppendUint32(buf, t)
		}
		out = append(out, sha256.Sum256(buf))
	}
	return out
}

// Keys returns the block names as the engine's KV events carry them: for
// vLLM a digest's last eight bytes, for SGLang its first eight (the signed
// integer it sends, read as 64 bits).
func (h *Namer) Keys(tokens []uint32, lora string) []uint64 {
	ds := h.Digests(tokens, lora)
	out := make([]uint64, len(ds))
	for i, d := range ds {
		if h.Algo == AlgoSGLangPage {
			out[i] = binary.BigEndian.Uint64(d[:8])
			continue
		}
		out[i] = EventKey(d[:])
	}
	return out
}

// EventKey is a digest as vLLM's events name it by default: its last eight
// bytes, big-endian (int.from_bytes(digest[-8:], "big")). A shorter value is
// read whole.
func EventKey(digest []byte) uint64 {
	if len(digest) > 8 {
		digest = digest[len(digest)-8:]
	}
	var k uint64
	for _, b := range digest {
		k = k<<8 | uint64(b)
	}
	return k
}

// appendBlock writes the canonical CBOR of (parent, tuple(tokens), extra):
// a 3-array of a 32-byte string, an array of unsigned ints, and null or a
// 1-array holding the adapter's name.
func appendBlock(b []byte, parent [32]byte, tokens []uint32, lora string) []byte {
	b = append(b, 0x83)
	b = appendHead(b, 2, 32)
	b = append(b, parent[:]...)
	b = appendHead(b, 4, uint64(len(tokens)))
	for _, t := range tokens {
		b = appendHead(b, 0, uint64(t))
	}
	if lora == "" {
		return append(b, 0xf6)
	}
	b = appendHead(b, 4, 1)
	return appendText(b, lora)
}

func appendText(b []byte, s string) []byte {
	b = appendHead(b, 3, uint64(len(s)))
	return append(b, s...)
}

// appendHead writes a CBOR head in its shortest form (RFC 8949 §4.2.1).
func appendHead(b []byte, major byte, v uint64) []byte {
	m := major << 5
	switch {
	case v < 24:
		return append(b, m|byte(v))
	case v <= 0xff:
		return append(b, m|24, byte(v))
	case v <= 0xffff:
		return binary.BigEndian.AppendUint16(append(b, m|25), uint16(v))
	case v <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, m|26), uint32(v))
	default:
		return binary.BigEndian.AppendUint64(append(b, m|27), v)
	}
}

// Block is the tokens per named block.
func (h *Namer) Block() int { return h.BlockSize }

// New returns the namer for an algorithm as a replica reports it.
func New(algo, seed string, blockSize int) (*Namer, error) {
	switch algo {
	case AlgoSHA256CBOR:
		return NewVLLM(seed, blockSize)
	case AlgoSGLangPage:
		return NewSGLang(blockSize)
	}
	return nil, fmt.Errorf("unknown block hash algorithm %s (known: %s, %s)", strconv.Quote(algo), AlgoSHA256CBOR, AlgoSGLangPage)
}
