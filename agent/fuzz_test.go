package agent

import (
	"os"
	"path/filepath"
	"testing"
)

// A config file is operator input: any bytes give a config or an error.
func FuzzLoadConfigFile(f *testing.F) {
	f.Add([]byte("node_id: n1\naddress: 10.0.0.1\njoin: [10.0.0.2:7946]\ngpus: [0, 1]\n"))
	f.Add([]byte("colour: red\n"))
	f.Add([]byte("stop_grace: -5s\nhang_timeout: x\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "agent.yaml")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Skip()
		}
		c, err := LoadConfigFile(p)
		if err != nil {
			return
		}
		c.Defaults()
		_ = c.Validate()
	})
}
