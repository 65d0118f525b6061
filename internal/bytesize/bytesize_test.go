package bytesize

import (
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"64Mi": 64 << 20, "64MiB": 64 << 20, "1M": 1e6, "1MB": 1e6, "512M": 512e6, "1048576": 1 << 20, "1.5Gi": 3 << 29,
		"2Ti": 2 << 40, "100Ki": 100 << 10, "3K": 3000, " 8Gi ": 8 << 30, "7B": 7, "1T": 1e12,
	} {
		got, err := Parse(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for in, msg := range map[string]string{
		"": "not a size", "Gi": "not a size", "-1Gi": "unknown unit", "12XB": "unknown unit", "1e3": "unknown unit",
		"99999999999999Ti": "too large", "1.5": "whole number", "0.1Ki": "whole number", "0": "not a size", "1..2M": "not a size",
		"64 Mi": "unknown unit", "1mi": "unknown unit",
	} {
		_, err := Parse(in)
		require.ErrorContains(t, err, msg, in)
	}
}

func TestParseIn(t *testing.T) {
	n, err := ParseIn("64Mi", 1<<20, 4<<30)
	require.NoError(t, err)
	require.Equal(t, int64(64<<20), n)
	_, err = ParseIn("1Ki", 1<<20, 4<<30)
	require.EqualError(t, err, `"1Ki": want between 1.0 MiB and 4.00 GiB`)
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1536: "1.5 KiB", 64 << 20: "64.0 MiB", 1288490189: "1.20 GiB", 2 << 40: "2.00 TiB"} {
		require.Equal(t, want, Format(n))
	}
}

// Any text parses to a positive size or an error, and a parsed binary size
// printed and parsed again stays within the printing's rounding.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"64Mi", "1.5Gi", "512M", "1048576", "-1", "1e3", "9999999999999999999Ti", ".", "1.Ki"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := Parse(s)
		if err != nil {
			return
		}
		if n <= 0 {
			t.Fatalf("Parse(%q) = %d", s, n)
		}
		_ = Format(n)
	})
}
