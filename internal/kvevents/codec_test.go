package kvevents

import (
	"encoding/hex"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func sample() Batch {
	return Batch{TS: 1733000000.5, DPRank: 0, Events: []Event{
		{Kind: Stored, Hashes: []uint64{1, 1 << 63}, Parent: 7, HasParent: true, Tokens: []uint32{1, 2, 3, 4}, BlockSize: 2, Medium: "GPU"},
		{Kind: Stored, Hashes: []uint64{9}, Tokens: []uint32{5, 6}, BlockSize: 2, LoRA: "sql", Medium: "GPU"},
		{Kind: Removed, Hashes: []uint64{1}, Medium: "GPU"},
		{Kind: Cleared},
	}}
}

// TestEncodeIsMsgspecBytes pins Encode to the bytes msgspec writes for
// vLLM's KVEventBatch (fields in declaration order, the "type" tag first,
// defaults omitted, data_parallel_rank set by the publisher), worked out by
// hand from the msgpack spec for one BlockStored.
func TestEncodeIsMsgspecBytes(t *testing.T) {
	b := Batch{TS: 0.5, Events: []Event{{Kind: Stored, Hashes: []uint64{200}, Tokens: []uint32{1, 300}, BlockSize: 2, Medium: "GPU"}}}
	want := "83" + // map of 3
		"a2" + hex.EncodeToString([]byte("ts")) + "cb3fe0000000000000" +
		"a6" + hex.EncodeToString([]byte("events")) + "91" +
		"88" + // the event: 8 entries
		"a4" + hex.EncodeToString([]byte("type")) + "ab" + hex.EncodeToString([]byte("BlockStored")) +
		"ac" + hex.EncodeToString([]byte("block_hashes")) + "91ccc8" +
		"b1" + hex.EncodeToString([]byte("parent_block_hash")) + "c0" +
		"a9" + hex.EncodeToString([]byte("token_ids")) + "9201cd012c" +
		"aa" + hex.EncodeToString([]byte("block_size")) + "02" +
		"a7" + hex.EncodeToString([]byte("lora_id")) + "c0" +
		"a6" + hex.EncodeToString([]byte("medium")) + "a3" + hex.EncodeToString([]byte("GPU")) +
		"a9" + hex.EncodeToString([]byte("lora_name")) + "c0" +
		"b2" + hex.EncodeToString([]byte("data_parallel_rank")) + "00"
	require.Equal(t, want, hex.EncodeToString(Encode(b)))
}

// TestEncodeSGLangIsMsgspecBytes pins EncodeSGLang to the bytes msgspec
// writes for SGLang's array_like structs (KVEventBatch [ts, events,
// attn_dp_rank]; BlockStored [tag, block_hashes, parent_block_hash,
// token_ids, block_size, lora_id, medium]), worked out by hand from the
// msgpack spec: a hash at or above 2^63 goes out as a negative int64.
func TestEncodeSGLangIsMsgspecBytes(t *testing.T) {
	b := Batch{TS: 0.5, Events: []Event{
		{Kind: Stored, Hashes: []uint64{1<<64 - 2}, Parent: 200, HasParent: true, Tokens: []uint32{1, 300}, BlockSize: 2, Medium: "GPU"},
		{Kind: Removed, Hashes: []uint64{5}, Medium: "GPU"},
	}}
	want := "93" + "cb3fe0000000000000" + "92" +
		"97" + "ab" + hex.EncodeToString([]byte("BlockStored")) + "91fe" + "ccc8" + "9201cd012c" + "02" + "c0" + "a3" + hex.EncodeToString([]byte("GPU")) +
		"93" + "ac" + hex.EncodeToString([]byte("BlockRemoved")) + "9105" + "a3" + hex.EncodeToString([]byte("GPU")) +
		"00"
	require.Equal(t, want, hex.EncodeToString(EncodeSGLang(b)))
	got, err := Decode(EncodeSGLang(b))
	require.NoError(t, err)
	require.Equal(t, b, got, "and it decodes back, the negative hash as its 64 bits")
}

func TestRoundTripBothForms(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"map", Encode(sample())},
		{"array", encodeArray(sample(), false)},
		{"array with digests", encodeArray(sample(), true)},
	} {
		got, err := Decode(tc.b)
		require.NoError(t, err, tc.name)
		require.Equal(t, sample(), got, tc.name)
	}
}

func TestDecodeErrors(t *testing.T) {
	h := func(s string) string { return hex.EncodeToString([]byte(s)) }
	for _, tc := range []struct {
		hex, want string
	}{
		{"", "not msgpack"},
		{"c1", "msgpack code 0xc1, want an array or a map"},
		{"01", "want an array or a map"},
		{"91cb3fe0000000000000", "want [ts, events"},
		{"92a1789190", "ts: not a number"},
		{"92cb3fe000000000000001", "events: kv event batch is not msgpack"},
		{"92cb3fe00000000000009101", "event 0: an event is msgpack code 0x1"},
		{"92cb3fe0000000000000919101", "event type: a map key is msgpack code 0x1"},
		{"92cb3fe00000000000009191ab" + h("BlockStored"), "BlockStored without block_hashes"},
		{"92cb3fe00000000000009192ac" + h("BlockRemoved") + "91c3", "block_hashes[0]: msgpack code 0xc3"},
		{"92cb3fe0000000000000900000", "after its end"},
		{"92cbffffffffffffffffddffffffff", "an array of 4294967295 elements in 0 bytes"},
		{"82a2" + h("ts") + "00a2" + h("ts") + "00", `has "ts" twice`},
		{"81a2" + h("ts") + "00", "without ts and events"},
		{"92cb3fe00000000000009181a1" + h("x") + "00", "does not start with its type"},
		{"94009000" + strings.Repeat("91", 40) + "00", "nested over 32 deep"},
		{"92cb3fe00000000000009193ab" + h("BlockStored") + "9101c3", "parent_block_hash: msgpack code 0xc3"},
		{"92cb3fe00000000000009194ab" + h("BlockStored") + "9101c091ff", "token_ids[0]: not a token id"},
		{"92cb3fe00000000000009195ab" + h("BlockStored") + "9101c09100" + "00", "block_size: not a block size"},
	} {
		b, err := hex.DecodeString(tc.hex)
		require.NoError(t, err)
		_, err = Decode(b)
		require.ErrorContains(t, err, tc.want, tc.hex)
	}
	// A newer engine's event type, and fields it added, are skipped.
	b, err := hex.DecodeString("92cb3fe00000000000009292a7" + h("Unknown") + "92010292ac" + h("BlockRemoved") + "9105")
	require.NoError(t, err)
	got, err := Decode(b)
	require.NoError(t, err)
	require.Equal(t, []Event{{Kind: Removed, Hashes: []uint64{5}}}, got.Events)
	b, err = hex.DecodeString("92cb3fe00000000000009183a4" + h("type") + "ac" + h("BlockRemoved") + "ac" + h("block_hashes") + "9105a9" + h("group_idx") + "9100")
	require.NoError(t, err)
	got, err = Decode(b)
	require.NoError(t, err)
	require.Equal(t, []Event{{Kind: Removed, Hashes: []uint64{5}}}, got.Events)
	// SGLang's signed hashes keep their 64 bits.
	b, err = hex.DecodeString("92cb3fe00000000000009192ac" + h("BlockRemoved") + "91d3ffffffffffffffff")
	require.NoError(t, err)
	got, err = Decode(b)
	require.NoError(t, err)
	require.Equal(t, []uint64{^uint64(0)}, got.Events[0].Hashes)
}

// FuzzDecode: any bytes give a batch or an error, never a panic; what decodes
// encodes and decodes back to the same batch.
func FuzzDecode(f *testing.F) {
	f.Add(Encode(sample()))
	f.Add(encodeArray(sample(), true))
	f.Add([]byte{0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := Decode(b)
		if err != nil {
			return
		}
		again, err := Decode(Encode(got))
		require.NoError(t, err)
		if len(got.Events) == 0 {
			got.Events = nil
		}
		if len(again.Events) == 0 {
			again.Events = nil
		}
		if got.TS != got.TS { // NaN
			return
		}
		require.Equal(t, norm(got), norm(again))
	})
}

// norm makes empty slices nil, as a round trip through Encode gives them.
func norm(b Batch) Batch {
	for i := range b.Events {
		e := &b.Events[i]
		if len(e.Hashes) == 0 {
			e.Hashes = nil
		}
		if len(e.Tokens) == 0 {
			e.Tokens = nil
		}
		if e.Kind == Removed || e.Kind == Cleared {
			e.Tokens, e.BlockSize, e.HasParent, e.Parent, e.LoRA = nil, 0, false, 0, ""
		}
		if e.Kind == Cleared {
			e.Hashes, e.Medium = nil, ""
		}
	}
	return b
}

// encodeArray writes the positional form of releases whose event structs
// were array_like, and hashes as 32-byte digests when digests is set
// (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): a digest here is the key padded
// to 32 bytes, which folds back to the key.
func encodeArray(b Batch, digests bool) []byte { return encodePositional(b, writer{digests: digests}) }
