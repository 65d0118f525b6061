package coordinator

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCheckConsole(t *testing.T) {
	for _, tc := range []struct {
		addr      string
		secured   bool
		cleartext bool
		err       string
	}{
		{addr: "127.0.0.1:7952", secured: false},
		{addr: "localhost:7952", secured: false},
		{addr: "[::1]:7952", secured: false},
		{addr: "127.0.0.1:7952", secured: true, cleartext: true},
		{addr: "10.0.0.5:7952", secured: true},
		{addr: "0.0.0.0:7952", secured: true},
		{addr: "0.0.0.0:7952", secured: false, err: "open to anyone"},
		{addr: ":7952", secured: false, err: "open to anyone"},
		{addr: "10.0.0.5:7952", secured: true, cleartext: true, err: "in the clear"},
		{addr: "nonsense", err: "want host:port"},
	} {
		err := checkConsole(&ConsoleConfig{Addr: tc.addr, Cleartext: tc.cleartext}, tc.secured)
		if tc.err == "" {
			assert.NoError(t, err, tc.addr)
		} else {
			assert.ErrorContains(t, err, tc.err, tc.addr)
		}
	}
}
