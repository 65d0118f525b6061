// Package kvevents speaks the engines' KV-cache event protocol: the
// msgpack batches vLLM's ZmqEventPublisher sends (and SGLang's, which uses
// the same types), over ZeroMQ PUB/SUB with a ROUTER socket to replay missed
// batches. docs/design/kv-events.md describes the wire format.
package kvevents

import (
	"bytes"
	"errors"
	"fmt"
	"math"

	"github.com/shoalhq/shoal/internal/kvhash"
	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// Kind is an event's type, as the engine tags it.
type Kind uint8

// Event kinds.
const (
	Stored  Kind = iota + 1 // BlockStored
	Removed                 // BlockRemoved
	Cleared                 // AllBlocksCleared
)

var kindNames = map[string]Kind{"BlockStored": Stored, "BlockRemoved": Removed, "AllBlocksCleared": Cleared}

func (k Kind) String() string {
	for n, v := range kindNames {
		if v == k {
			return n
		}
	}
	return fmt.Sprintf("Kind(%d)", k)
}

// Event is one KV-cache event. Hashes are the engine's block names as 64-bit
// keys (a digest sent whole is folded to its last eight bytes, the key the
// engine would otherwise have sent).
type Event struct {
	Kind      Kind
	Hashes    []uint64
	Parent    uint64 // BlockStored: the block before the first; 0 with HasParent false
	HasParent bool
	Tokens    []uint32 // BlockStored: the stored blocks' tokens
	BlockSize int
	LoRA      string // lora_name, when the blocks belong to an adapter
	Medium    string // "GPU", "CPU", ...; empty when the engine sent None
}

// Batch is one published message: the events of one engine step.
type Batch struct {
	TS     float64
	Events []Event
	DPRank int // data_parallel_rank; 0 when absent
}

// MaxPayload bounds one batch; a larger one is refused.
const MaxPayload = 64 << 20

// Decode parses one batch in either form vLLM has used: a map keyed by field
// name with a "type" tag per event (current vLLM, msgspec structs with
// tag=True), or positional arrays whose first element is the tag (releases
// whose structs were array_like). Unknown event types are skipped, unknown
// fields ignored; anything else malformed is an error. It reads with the
// msgpack library's typed calls and never trusts a declared length beyond the
// bytes left (the library's generic decoding allocates whatever an array
// header claims).
func Decode(b []byte) (Batch, error) {
	if len(b) > MaxPayload {
		return Batch{}, fmt.Errorf("kv event batch of %d bytes is over the %d-byte limit", len(b), MaxPayload)
	}
	r := &reader{r: bytes.NewReader(b)}
	r.d = msgpack.NewDecoder(r.r)
	out, err := r.batch()
	if err != nil {
		return Batch{}, err
	}
	if r.r.Len() != 0 {
		return Batch{}, fmt.Errorf("kv event batch has %d bytes after its end", r.r.Len())
	}
	return out, nil
}

type reader struct {
	r *bytes.Reader
	d *msgpack.Decoder
}

func (r *reader) peek() (byte, error) {
	c, err := r.d.PeekCode()
	if err != nil {
		return 0, fmt.Errorf("kv event batch is not msgpack: %w", err)
	}
	return c, nil
}

func isArray(c byte) bool {
	return msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32
}
func isMap(c byte) bool { return msgpcode.IsFixedMap(c) || c == msgpcode.Map16 || c == msgpcode.Map32 }
func isBytes(c byte) bool {
	return msgpcode.IsFixedString(c) || c == msgpcode.Str8 || c == msgpcode.Str16 || c == msgpcode.Str32 ||
		c == msgpcode.Bin8 || c == msgpcode.Bin16 || c == msgpcode.Bin32
}

// length checks a declared element count against the bytes left: every
// element takes at least one.
func (r *reader) length(n int, err error) (int, error) {
	if err != nil {
		return 0, fmt.Errorf("kv event batch is not msgpack: %w", err)
	}
	if n < 0 {
		return 0, nil
	}
	if n > r.r.Len() {
		return 0, fmt.Errorf("an array of %d elements in %d bytes", n, r.r.Len())
	}
	return n, nil
}

func (r *reader) isNil() (bool, error) {
	c, err := r.peek()
	if err != nil {
		return false, err
	}
	if c == msgpcode.Nil {
		return true, r.d.DecodeNil()
	}
	return false, nil
}

func (r *reader) batch() (Batch, error) {
	c, err := r.peek()
	if err != nil {
		return Batch{}, err
	}
	var out Batch
	field := func(name string) error {
		switch name {
		case "ts":
			c, err := r.peek()
			if err != nil {
				return err
			}
			if !msgpcode.IsFixedNum(c) && (c < msgpcode.Float || c > msgpcode.Int64) {
				return fmt.Errorf("ts: not a number (msgpack code %#x)", c)
			}
			if out.TS, err = r.d.DecodeFloat64(); err != nil {
				return fmt.Errorf("ts: %w", err)
			}
		case "events":
			n, err := r.length(r.d.DecodeArrayLen())
			if err != nil {
				return fmt.Errorf("events: %w", err)
			}
			for i := 0; i < n; i++ {
				ev, known, err := r.event()
				if err != nil {
					return fmt.Errorf("event %d: %w", i, err)
				}
				if known {
					out.Events = append(out.Events, ev)
				}
			}
		case "data_parallel_rank":
			if null, err := r.isNil(); null || err != nil {
				return err
			}
			n, err := r.integer()
			if err != nil || n < 0 || n > math.MaxInt32 {
				return fmt.Errorf("data_parallel_rank: not a rank (%v)", err)
			}
			out.DPRank = int(n)
		default:
			return r.skip(0)
		}
		return nil
	}
	switch {
	case isArray(c):
		n, err := r.length(r.d.DecodeArrayLen())
		if err != nil {
			return Batch{}, err
		}
		if n < 2 {
			return Batch{}, fmt.Errorf("kv event batch array has %d elements, want [ts, events, ...]", n)
		}
		for i, name := range []string{"ts", "events", "data_parallel_rank"} {
			if i < n {
				if err := field(name); err != nil {
					return Batch{}, err
				}
			}
		}
		for i := 3; i < n; i++ {
			if err := r.skip(0); err != nil {
				return Batch{}, err
			}
		}
	case isMap(c):
		n, err := r.length(r.d.DecodeMapLen())
		if err != nil {
			return Batch{}, err
		}
		seen := map[string]bool{}
		for i := 0; i < n; i++ {
			k, err := r.key()
			if err != nil {
				return Batch{}, err
			}
			if seen[k] {
				return Batch{}, fmt.Errorf("kv event batch has %q twice", k)
			}
			seen[k] = true
			if err := field(k); err != nil {
				return Batch{}, err
			}
		}
		if !seen["ts"] || !seen["events"] {
			return Batch{}, errors.New("kv event batch map without ts and events")
		}
	default:
		return Batch{}, fmt.Errorf("kv event batch is msgpack code %#x, want an array or a map", c)
	}
	return out, nil
}

// maxDepth bounds the nesting of a value being skipped (an unknown field),
// so that no input can exhaust the stack.
const maxDepth = 32

// skip reads past one value of any shape.
func (r *reader) skip(depth int) error {
	if depth > maxDepth {
		return fmt.Errorf("a value nested over %d deep", maxDepth)
	}
	c, err := r.peek()
	if err != nil {
		return err
	}
	n := 0
	switch {
	case isArray(c):
		if n, err = r.length(r.d.DecodeArrayLen()); err != nil {
			return err
		}
	case isMap(c):
		if n, err = r.length(r.d.DecodeMapLen()); err != nil {
			return err
		}
		n *= 2
	default:
		if err := r.d.Skip(); err != nil {
			return fmt.Errorf("kv event batch is not msgpack: %w", err)
		}
		return nil
	}
	for i := 0; i < n; i++ {
		if err := r.skip(depth + 1); err != nil {
			return err
		}
	}
	return nil
}

func (r *reader) key() (string, error) {
	c, err := r.peek()
	if err != nil {
		return "", err
	}
	if !isBytes(c) {
		return "", fmt.Errorf("a map key is msgpack code %#x, want a string", c)
	}
	return r.d.DecodeString()
}

// fields are an event's fields in the order array_like structs list them.
var fields = map[Kind][]string{
	Stored:  {"block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"},
	Removed: {"block_hashes", "medium"},
	Cleared: {},
}

func (r *reader) event() (Event, bool, error) {
	c, err := r.peek()
	if err != nil {
		return Event{}, false, err
	}
	var ev Event
	known := false
	field := func(name string) error {
		if !known {
			return r.skip(0)
		}
		switch name {
		case "block_hashes":
			n, err := r.length(r.d.DecodeArrayLen())
			if err != nil {
				return fmt.Errorf("block_hashes: %w", err)
			}
			ev.Hashes = make([]uint64, n)
			for i := range ev.Hashes {
				if ev.Hashes[i], err = r.hash(); err != nil {
					return fmt.Errorf("block_hashes[%d]: %w", i, err)
				}
			}
		case "parent_block_hash":
			if null, err := r.isNil(); null || err != nil {
				return err
			}
			if ev.Parent, err = r.hash(); err != nil {
				return fmt.Errorf("parent_block_hash: %w", err)
			}
			ev.HasParent = true
		case "token_ids":
			if null, err := r.isNil(); null || err != nil {
				return err
			}
			n, err := r.length(r.d.DecodeArrayLen())
			if err != nil {
				return fmt.Errorf("token_ids: %w", err)
			}
			ev.Tokens = make([]uint32, n)
			for i := range ev.Tokens {
				t, err := r.integer()
				if err != nil || t < 0 || t > math.MaxUint32 {
					return fmt.Errorf("token_ids[%d]: not a token id", i)
				}
				ev.Tokens[i] = uint32(t)
			}
		case "block_size":
			if null, err := r.isNil(); null || err != nil {
				return err
			}
			n, err := r.integer()
			if err != nil || n <= 0 || n > 1<<20 {
				return errors.New("block_size: not a block size")
			}
			ev.BlockSize = int(n)
		case "medium", "lora_name":
			if null, err := r.isNil(); null || err != nil {
				return err
			}
			c, err := r.peek()
			if err != nil {
				return err
			}
			if !isBytes(c) {
				return fmt.Errorf("%s: msgpack code %#x, want a string", name, c)
			}
			s, err := r.d.DecodeString()
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if name == "medium" {
				ev.Medium = s
			} else {
				ev.LoRA = s
			}
		default:
			return r.skip(0)
		}
		return nil
	}
	tag := func() error {
		name, err := r.key()
		if err != nil {
			return fmt.Errorf("event type: %w", err)
		}
		ev.Kind, known = kindNames[name]
		return nil
	}
	switch {
	case isArray(c):
		n, err := r.length(r.d.DecodeArrayLen())
		if err != nil {
			return Event{}, false, err
		}
		if n == 0 {
			return Event{}, false, errors.New("empty event array")
		}
		if err := tag(); err != nil {
			return Event{}, false, err
		}
		for i := 1; i < n; i++ {
			name := ""
			if fs := fields[ev.Kind]; i-1 < len(fs) {
				name = fs[i-1]
			}
			if err := field(name); err != nil {
				return Event{}, false, err
			}
		}
		if known && ev.Kind != Cleared && n < 2 {
			return Event{}, false, fmt.Errorf("%s without block_hashes", ev.Kind)
		}
	case isMap(c):
		n, err := r.length(r.d.DecodeMapLen())
		if err != nil {
			return Event{}, false, err
		}
		// msgspec writes the tag first; a map that does not is refused
		// rather than buffered.
		if n == 0 {
			return Event{}, false, errors.New("event map without a type")
		}
		if k, err := r.key(); err != nil || k != "type" {
			return Event{}, false, fmt.Errorf("event map does not start with its type (%q)", k)
		}
		if err := tag(); err != nil {
			return Event{}, false, err
		}
		seen := map[string]bool{}
		for i := 1; i < n; i++ {
			k, err := r.key()
			if err != nil {
				return Event{}, false, err
			}
			if seen[k] {
				return Event{}, false, fmt.Errorf("event has %q twice", k)
			}
			seen[k] = true
			if err := field(k); err != nil {
				return Event{}, false, err
			}
		}
		if known && ev.Kind != Cleared && !seen["block_hashes"] {
			return Event{}, false, fmt.Errorf("%s without block_hashes", ev.Kind)
		}
	default:
		return Event{}, false, fmt.Errorf("an event is msgpack code %#x, want an array or a map", c)
	}
	if !known {
		return Event{}, false, nil // a newer engine's event: not ours to read
	}
	if ev.Kind == Removed {
		ev.Tokens, ev.BlockSize, ev.Parent, ev.HasParent, ev.LoRA = nil, 0, 0, false, ""
	}
	return ev, true, nil
}

// hash reads a block name: an integer (its 64 bits as sent; SGLang's are
// signed) or a digest as bytes, folded to its last eight bytes.
func (r *reader) hash() (uint64, error) {
	c, err := r.peek()
	if err != nil {
		return 0, err
	}
	switch {
	case isBytes(c):
		b, err := r.d.DecodeBytes()
		if err != nil {
			return 0, err
		}
		if len(b) == 0 {
			return 0, errors.New("empty digest")
		}
		return kvhash.EventKey(b), nil
	case c == msgpcode.Uint64:
		return r.d.DecodeUint64()
	case msgpcode.IsFixedNum(c) || (c >= msgpcode.Uint8 && c <= msgpcode.Int64):
		n, err := r.d.DecodeInt64()
		return uint64(n), err
	default:
		return 0, fmt.Errorf("msgpack code %#x, want an integer or bytes", c)
	}
}

func (r *reader) integer() (int64, error) {
	c, err := r.peek()
	if err != nil {
		return 0, err
	}
	if !msgpcode.IsFixedNum(c) && (c < msgpcode.Uint8 || c > msgpcode.Int64) {
		return 0, fmt.Errorf("msgpack code %#x, want an integer", c)
	}
	if c == msgpcode.Uint64 {
		u, err := r.d.DecodeUint64()
		if err != nil || u > math.MaxInt64 {
			return 0, fmt.Errorf("integer too large")
		}
		return int64(u), nil
	}
	return r.d.DecodeInt64()
}

// Encode writes a batch as current vLLM does: msgspec structs as maps, each
// event tagged by "type", fields with default values left out, hashes as
// unsigned integers.
func Encode(b Batch) []byte {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	w := writer{enc: enc}
	w.mapLen(3)
	w.str("ts")
	w.err(enc.EncodeFloat64(b.TS))
	w.str("events")
	w.err(enc.EncodeArrayLen(len(b.Events)))
	for _, e := range b.Events {
		w.event(e, false)
	}
	w.str("data_parallel_rank") // the publisher always sets it
	w.err(enc.EncodeInt(int64(b.DPRank)))
	return buf.Bytes()
}

// EncodeSGLang writes a batch as SGLang's ZmqEventPublisher does: msgspec
// structs that are array_like, so the batch is [ts, events, attn_dp_rank]
// and each event [tag, fields...] in declaration order (BlockStored:
// block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium),
// hashes as signed 64-bit integers.
func EncodeSGLang(b Batch) []byte { return encodePositional(b, writer{sglang: true}) }

// encodePositional writes b as an array_like batch, [ts, events, rank],
// each event positional, with w's choices of hash form.
func encodePositional(b Batch, w writer) []byte {
	var buf bytes.Buffer
	w.enc = msgpack.NewEncoder(&buf)
	w.err(w.enc.EncodeArrayLen(3))
	w.err(w.enc.EncodeFloat64(b.TS))
	w.err(w.enc.EncodeArrayLen(len(b.Events)))
	for _, e := range b.Events {
		w.event(e, true)
	}
	w.err(w.enc.EncodeInt(int64(b.DPRank)))
	return buf.Bytes()
}

// writer encodes into a bytes.Buffer, which cannot fail; err panics if the
// encoder ever says otherwise. Its positional form (array) and whole digests
// (digests) are vLLM's older encodings, which only the decoder's tests write;
// sglang is SGLang's (positional, signed hashes, no lora_name).
type writer struct {
	enc     *msgpack.Encoder
	digests bool
	sglang  bool
}

func (w writer) err(err error) {
	if err != nil {
		panic("kvevents: encoding into memory failed: " + err.Error())
	}
}
func (w writer) str(s string) { w.err(w.enc.EncodeString(s)) }
func (w writer) mapLen(n int) { w.err(w.enc.EncodeMapLen(n)) }
func (w writer) hash(h uint64) {
	if w.digests {
		var d [32]byte
		for i := 0; i < 8; i++ {
			d[31-i] = byte(h >> (8 * i))
		}
		w.err(w.enc.EncodeBytes(d[:]))
		return
	}
	if w.sglang {
		w.err(w.enc.EncodeInt(int64(h)))
		return
	}
	w.err(w.enc.EncodeUint(h))
}

func (w writer) optStr(s string) {
	if s == "" {
		w.err(w.enc.EncodeNil())
		return
	}
	w.str(s)
}

func (w writer) event(e Event, array bool) {
	name := e.Kind.String()
	fs := fields[e.Kind]
	if w.sglang && e.Kind == Stored {
		fs = fs[:len(fs)-1] // SGLang's BlockStored ends at medium
	}
	if array {
		w.err(w.enc.EncodeArrayLen(1 + len(fs)))
		w.str(name)
	} else {
		w.mapLen(1 + len(fs))
		w.str("type")
		w.str(name)
	}
	for _, f := range fs {
		if !array {
			w.str(f)
		}
		switch f {
		case "block_hashes":
			w.err(w.enc.EncodeArrayLen(len(e.Hashes)))
			for _, h := range e.Hashes {
				w.hash(h)
			}
		case "parent_block_hash":
			if e.HasParent {
				w.hash(e.Parent)
			} else {
				w.err(w.enc.EncodeNil())
			}
		case "token_ids":
			w.err(w.enc.EncodeArrayLen(len(e.Tokens)))
			for _, t := range e.Tokens {
				w.err(w.enc.EncodeUint(uint64(t)))
			}
		case "block_size":
			if e.BlockSize == 0 {
				w.err(w.enc.EncodeNil()) // not sent: read back as not sent
			} else {
				w.err(w.enc.EncodeInt(int64(e.BlockSize)))
			}
		case "lora_id":
			w.err(w.enc.EncodeNil())
		case "medium":
			w.optStr(e.Medium)
		case "lora_name":
			w.optStr(e.LoRA)
		}
	}
}
