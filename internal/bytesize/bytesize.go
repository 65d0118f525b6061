// Package bytesize is shoal's one parser and printer of sizes: every size
// flag (--part-size, --limit-rate, --log-max-size), the spec's
// engine.shmSize, and every size the CLI and the logs print. Units follow
// Kubernetes quantities: Ki, Mi, Gi, Ti are binary (KiB, MiB, GiB, TiB are
// accepted too); K, M, G, T are decimal (KB, MB, GB, TB too); a bare number
// is bytes. Sizes are printed in binary units, named as such (GiB, not GB).
package bytesize

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Units is how a flag's help states what its sizes may be written as.
const Units = "bytes, or with a unit: Ki, Mi, Gi, Ti (binary) or K, M, G, T (decimal), e.g. 64Mi"

var units = map[string]float64{
	"": 1, "B": 1,
	"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
	"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
	"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
	"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
}

// Parse reads a size: "64Mi", "512M", "1.5Gi", "1048576".
func Parse(s string) (int64, error) {
	v := strings.TrimSpace(s)
	i := 0
	for i < len(v) && (v[i] >= '0' && v[i] <= '9' || v[i] == '.') {
		i++
	}
	mult, ok := units[v[i:]]
	if !ok {
		return 0, fmt.Errorf("%q: unknown unit %q; sizes are %s", s, v[i:], Units)
	}
	n, err := strconv.ParseFloat(v[:i], 64)
	if err != nil || i == 0 || n <= 0 || math.IsInf(n, 0) {
		return 0, fmt.Errorf("%q is not a size: sizes are %s", s, Units)
	}
	b := n * mult
	if b >= 1<<62 {
		return 0, fmt.Errorf("%q is too large", s)
	}
	if b != math.Trunc(b) {
		return 0, fmt.Errorf("%q is not a whole number of bytes", s)
	}
	return int64(b), nil
}

// ParseIn is Parse with bounds, both inclusive.
func ParseIn(s string, lo, hi int64) (int64, error) {
	n, err := Parse(s)
	if err != nil {
		return 0, err
	}
	if n < lo || n > hi {
		return 0, fmt.Errorf("%q: want between %s and %s", s, Format(lo), Format(hi))
	}
	return n, nil
}

// Format prints a byte count in binary units: "512 B", "1.5 KiB",
// "64.0 MiB", "1.20 GiB", "2.00 TiB".
func Format(n int64) string {
	f := float64(n)
	switch {
	case n >= 1<<40:
		return fmt.Sprintf("%.2f TiB", f/(1<<40))
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", f/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", f/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", f/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
