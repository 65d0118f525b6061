package kvhash

import (
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"testing"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"
)

// seq is the token ids from..to.
func seq(from, to uint32) []uint32 {
	var out []uint32
	for i := from; i <= to; i++ {
		out = append(out, i)
	}
	return out
}

// Golden vectors, computed by a separate Python program from hashlib and the
// CBOR rules of RFC 8949 (not from this package):
//
//	parent = sha256(cbor(seed)); for each block:
//	parent = sha256(cbor([parent, [tokens...], None or [lora]]))
//	key = int.from_bytes(parent[-8:], "big")
func TestVLLMGolden(t *testing.T) {
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

// SGLang's golden vectors, computed by a separate Python program from
// hashlib, as RadixKey.hash_page and hash_str_to_int64 do:
//
//	prior = None; for each full page:
//	  h = sha256(); h.update(bytes.fromhex(prior)) if prior
//	  for t in page: h.update(t.to_bytes(4, "little", signed=False))
//	  prior = h.hexdigest()
//	  key = int(prior[:16], 16) (SGLang sends it as a signed int64)
func TestSGLangGolden(t *testing.T) {
	cases := []struct {
		page   int
		tokens []uint32
		want   []uint64
	}{
		{16, seq(1, 32), []uint64{8635429971592222890, 1256577331724852459}},
		{16, seq(1, 40), []uint64{8635429971592222890, 1256577331724852459}}, // the partial page is not cached
		{64, seq(1, 64), []uint64{905019192701563378}},
		{8, []uint32{151643, 872, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 77091, 198, 9707, 0,
			70000, 23, 24, 255, 256, 65535, 65536, 1<<32 - 1}, []uint64{8546727734477184144, 4343301987313042265, 6288010670108832527}},
		{1, seq(1, 3), []uint64{7470307888890966271, 16812098782497686225, 7325169757385981536}}, // above 2^63: a negative int64 on the wire
		{16, seq(1, 15), []uint64{}},
	}
	for _, c := range cases {
		h, err := NewSGLang(c.page)
		require.NoError(t, err)
		require.Equal(t, c.want, h.Keys(c.tokens, ""), "page %d", c.page)
	}
	h, err := New(AlgoSGLangPage, "", 16)
	require.NoError(t, err)
	require.Equal(t, []uint64{8635429971592222890}, h.Keys(seq(1, 16), ""), "no seed is involved")
	require.Empty(t, h.Keys(seq(1, 16), "sql-lora"), "an adapter's pages are not named")
	_, err = NewSGLang(0)
	require.ErrorContains(t, err, "positive")
}

func TestNewRejects(t *testing.T) {
	_, err := NewVLLM("", 16)
	require.ErrorContains(t, err, "PYTHONHASHSEED")
	_, err = NewVLLM("0", 0)
	require.ErrorContains(t, err, "positive")
	_, err = New("sha256", "0", 16)
	require.ErrorContains(t, err, `unknown block hash algorithm "sha256" (known: sha256_cbor, sglang_page_sha256)`)
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

// FuzzSGLangMatchesHexChain holds the page chain to a transcription of
// SGLang's code that keeps each digest as hex text, as SGLang does, and
// reads the key from its first sixteen hex digits.
func FuzzSGLangMatchesHexChain(f *testing.F) {
	f.Add(uint8(16), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18})
	f.Add(uint8(1), []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x18})
	f.Fuzz(func(t *testing.T, page uint8, raw []byte) {
		if page == 0 {
			return
		}
		var tokens []uint32
		for i := 0; i+4 <= len(raw); i += 4 {
			tokens = append(tokens, uint32(raw[i])<<24|uint32(raw[i+1])<<16|uint32(raw[i+2])<<8|uint32(raw[i+3]))
		}
		h, err := NewSGLang(int(page))
		require.NoError(t, err)
		var want []uint64
		prior := ""
		for i := 0; i+int(page) <= len(tokens); i += int(page) {
			d := sha256.New()
			if prior != "" {
				b, err := hex.DecodeString(prior)
				require.NoError(t, err)
				d.Write(b)
			}
			for _, tok := range tokens[i : i+int(page)] {
				d.Write([]byte{byte(tok), byte(tok >> 8), byte(tok >> 16), byte(tok >> 24)})
			}
			prior = hex.EncodeToString(d.Sum(nil))
			k, err := strconv.ParseUint(prior[:16], 16, 64)
			require.NoError(t, err)
			want = append(want, k)
		}
		got := h.Keys(tokens, "")
		if len(want) == 0 {
			require.Empty(t, got)
			return
		}
		require.Equal(t, want, got)
	})
}
