package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestInterspersed(t *testing.T) {
	for _, c := range []struct{ in, want []string }{
		{[]string{"shoal", "get", "replicas", "demo", "-o", "json"}, []string{"shoal", "get", "replicas", "-o", "json", "demo"}},
		{[]string{"shoal", "get", "replicas", "-o", "json", "demo"}, []string{"shoal", "get", "replicas", "-o", "json", "demo"}},
		{[]string{"shoal", "--log-level", "debug", "describe", "deployment", "x", "--coordinator", "h:1"},
			[]string{"shoal", "--log-level", "debug", "describe", "--coordinator", "h:1", "deployment", "x"}},
		{[]string{"shoal", "delete", "deployment", "x"}, []string{"shoal", "delete", "deployment", "x"}},
		{[]string{"shoal", "agent", "--address", "1.2.3.4"}, []string{"shoal", "agent", "--address", "1.2.3.4"}},
		{[]string{"shoal", "get"}, []string{"shoal", "get"}},
		{[]string{"shoal"}, []string{"shoal"}},
	} {
		require.Equal(t, c.want, interspersed(c.in))
	}
}
