// Package testbin builds the shoal and shoal-sim binaries once for a test
// binary that runs them as processes (test/e2e, test/chaos).
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Build compiles cmd/shoal and cmd/shoal-sim into a new temporary directory
// and returns it; the caller removes it. The packages are found relative to
// the calling test's directory (test/<name>).
func Build() (string, error) {
	dir, err := os.MkdirTemp("", "shoal-test-bin-")
	if err != nil {
		return "", err
	}
	for _, b := range []string{"shoal", "shoal-sim"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, b), "../../cmd/"+b)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		cmd.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
		if err := cmd.Run(); err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("build %s: %w", b, err)
		}
	}
	return dir, nil
}
