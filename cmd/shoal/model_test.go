package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/shoalhq/shoal/model"
	"github.com/stretchr/testify/require"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"64MiB": 64 << 20, "64Mi": 64 << 20, "8M": 8e6, "1GiB": 1 << 30, "1048576": 1 << 20, "2G": 2e9} {
		got, err := parseSize(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "abc", "-5MiB", "1KiB", "8GiB", "1.5", "64 MiB x"} {
		_, err := parseSize(in)
		require.Error(t, err, in)
	}
}

func TestProgressBar(t *testing.T) {
	var b bytes.Buffer
	pb := &progressBar{w: &b}
	pb.update(model.Progress{Phase: "downloading", Files: 10, FilesDone: 3, Bytes: 10 << 30, BytesDone: 4 << 30, Rate: 1 << 30, ETA: 6 * time.Second})
	out := b.String()
	require.Contains(t, out, " 40.0%")
	require.Contains(t, out, "4.00 GiB / 10.00 GiB")
	require.Contains(t, out, "1.00 GiB/s")
	require.Contains(t, out, "files 3/10")
	require.Contains(t, out, "ETA 6s")
	require.Equal(t, 12, strings.Count(out, "="), "40% of a 30-wide bar")
	b.Reset()
	_, _ = pb.Write([]byte("level=WARN msg=x\n"))
	require.True(t, strings.HasSuffix(b.String(), "ETA 6s"), "the bar is redrawn under a log line")
}

func TestReferenceDocIsCurrent(t *testing.T) {
	var b bytes.Buffer
	writeReference(&b, newApp())
	want, err := os.ReadFile("../../docs/reference.md")
	require.NoError(t, err)
	require.True(t, b.String() == string(want), "docs/reference.md is stale: run make docs")
}
