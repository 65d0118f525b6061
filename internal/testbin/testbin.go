// Package testbin builds the shoal and shoal-sim binaries once for a test
// binary that runs them as processes (test/e2e, test/chaos).
package testbin

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
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

// Main is a TestMain for such packages: under -short it runs nothing (they
// start real processes), else it builds the binaries into *binDir, runs the
// tests and removes them.
func Main(m *testing.M, binDir *string) {
	flag.Parse()
	if testing.Short() {
		os.Exit(0)
	}
	dir, err := Build()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	*binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		// The tests run clients (gRPC, HTTP) in this process: none may leak.
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}
