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
// (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, on by default). VLLM is that rule.
package kvhash

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
)

// AlgoSHA256CBOR is the one naming rule a router can compute: vLLM's
// --prefix-caching-hash-algo sha256_cbor.
const AlgoSHA256CBOR = "sha256_cbor"

// VLLM hashes token blocks as vLLM's sha256_cbor prefix caching does. It is
// comparable: two replicas with the same seed and block size have equal
// hashers, and a prompt's names are computed once for both.
type VLLM struct {
	BlockSize int
	none      [32]byte
}

// NewVLLM returns the hasher for an engine started with PYTHONHASHSEED=seed
// and --block-size blockSize. vLLM reads the seed as a string; shoal always
// sets one, since without it NONE_HASH is random per process and no two
// replicas (nor a router) could agree on a block's name.
func NewVLLM(seed string, blockSize int) (*VLLM, error) {
	if blockSize <= 0 {
		return nil, fmt.Errorf("block size must be positive, not %d", blockSize)
	}
	if seed == "" {
		return nil, errors.New("hash seed is empty: the engine's NONE_HASH would be random (set PYTHONHASHSEED)")
	}
	h := &VLLM{BlockSize: blockSize}
	h.none = sha256.Sum256(appendText(nil, seed))
	return h, nil
}

// NoneHash is NONE_HASH, the parent of a prompt's first block.
func (h *VLLM) NoneHash() [32]byte { return h.none }

// Digests returns the full SHA-256 digest of each full block of tokens, in
// order, each chained over the ones before. lora, when not empty, is the
// adapter's name (vLLM's extra key for every block under a LoRA request).
func (h *VLLM) Digests(tokens []uint32, lora string) [][32]byte {
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

// Keys returns the block names as vLLM's KV events carry them.
func (h *VLLM) Keys(tokens []uint32, lora string) []uint64 {
	ds := h.Digests(tokens, lora)
	out := make([]uint64, len(ds))
	for i, d := range ds {
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
func (h *VLLM) Block() int { return h.BlockSize }

// New returns the hasher for an algorithm as a replica reports it.
func New(algo, seed string, blockSize int) (*VLLM, error) {
	if algo != AlgoSHA256CBOR {
		return nil, fmt.Errorf("unknown block hash algorithm %s (known: %s)", strconv.Quote(algo), AlgoSHA256CBOR)
	}
	return NewVLLM(seed, blockSize)
}
