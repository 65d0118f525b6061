package kvhash

import (
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"
)

// Golden vectors, computed by a separate Python program from hashlib and the
// CBOR rules of RFC 8949 (not from this package):
//
//	parent = sha256(cbor(seed)); for each block:
//	parent = sha256(cbor([parent, [tokens...], None or [lora]]))
//	key = int.from_bytes(parent[-8:], "big")
func TestVLLMGolden(t *testing.T) {
	seq := func(from, to uint32) []uint32 {
		var out []uint32
		for i := from; i <= to; i++ {
			out = append(out, i)
		}
		return out
	}
	h0, err := NewVLLM("0", 16)
	require.NoError(t, err)
	none := h0.NoneHash()
	require.Equal(t, "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e", hex.EncodeToString(none[:]))
	cases := []struct {
		seed   string
		block  int
		tokens []uint32
		lora   string
		want   []uint64
	}{
		{"0", 16, seq(1, 32), "", []uint64{3236607068019569386, 2758186210834249151}},
		{"0", 16, seq(1, 40), "", []uint64{3236607068019569386, 2758186210834249151}}, // the partial block is not named
		{"10", 64, seq(1, 64), "", []uint64{6157663189479258408}},
		{"42", 8, []uint32{151643, 872, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 77091, 198, 9707, 0,
			70000, 23, 24, 255, 256, 65535, 65536, 1<<32 - 1}, "", []uint64{18018993142051060340, 3175352602618483331, 12687797921317716764}},
		{"0", 16, seq(1, 16), "sql-lora", []uint64{291935110711472582}},
		{"0", 16, seq(1, 15), "", []uint64{}},
	}
	for _, c := range cases {
		h, err := NewVLLM(c.seed, c.block)
		require.NoError(t, err)
		require.Equal(t, c.want, h.Keys(c.tokens, c.lora), "seed %s block %d", c.seed, c.block)
	}
}

func TestNewRejects(t *testing.T) {
	_, err := NewVLLM("", 16)
	require.ErrorContains(t, err, "PYTHONHASHSEED")
	_, err = NewVLLM("0", 0)
	require.ErrorContains(t, err, "positive")
	_, err = New("sha256", "0", 16)
	require.ErrorContains(t, err, `unknown block hash algorithm "sha256"`)
	h, err := New(AlgoSHA256CBOR, "0", 4)
	require.NoError(t, err)
	require.Equal(t, 4, h.Block())
	again, err := NewVLLM("0", 4)
	require.NoError(t, err)
	require.Equal(t, *h, *again, "equal settings, equal hashers (one map key)")
}

// FuzzVLLMMatchesCBORLibrary holds the hand-written CBOR to fxamacker/cbor's
// canonical encoding of the same tuple, block by block.
func FuzzVLLMMatchesCBORLibrary(f *testing.F) {
	f.Add("0", uint8(16), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18}, "")
	f.Add("4294967295", uint8(3), []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x18, 0, 0, 1, 0}, "a-lora")
	enc, err := cbor.CanonicalEncOptions().EncMode()
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, seed string, block uint8, raw []byte, lora string) {
		if seed == "" || block == 0 {
			return
		}
		var tokens []uint32
		for i := 0; i+4 <= len(raw); i += 4 {
			tokens = append(tokens, uint32(raw[i])<<24|uint32(raw[i+1])<<16|uint32(raw[i+2])<<8|uint32(raw[i+3]))
		}
		h, err := NewVLLM(seed, int(block))
		require.NoError(t, err)
		sb, err := enc.Marshal(seed)
		require.NoError(t, err)
		parent := sha256.Sum256(sb)
		require.Equal(t, parent, h.NoneHash())
		got := h.Digests(tokens, lora)
		require.Len(t, got, len(tokens)/int(block))
		for i := range got {
			var extra any
			if lora != "" {
				extra = []string{lora}
			}
			b, err := enc.Marshal([]any{parent[:], tokens[i*int(block) : (i+1)*int(block)], extra})
			require.NoError(t, err)
			parent = sha256.Sum256(b)
			require.Equal(t, parent, got[i], "block %d", i)
		}
	})
}
