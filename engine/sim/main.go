package sim

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
)

// Main dispatches on the name the binary was invoked as (busybox style):
// `ray …`, `vllm …`, or `shoal-sim ray|vllm …`. It returns the exit code.
func Main(ctx context.Context, argv []string, stdout, stderr io.Writer) int {
	if len(argv) == 0 {
		return 2
	}
	name := filepath.Base(argv[0])
	args := argv[1:]
	if strings.HasPrefix(name, "python") {
		// python3 -m sglang.launch_server …: the only module the simulator plays.
		if len(args) >= 2 && args[0] == "-m" && args[1] == "sglang.launch_server" {
			return SGLang(ctx, args[2:], stdout, stderr)
		}
		fmt.Fprintln(stderr, "shoal-sim stands in for python3 only as: python3 -m sglang.launch_server …")
		return 2
	}
	if name != "ray" && name != "vllm" {
		if len(args) == 0 {
			fmt.Fprintln(stderr, "usage: shoal-sim ray|vllm ARGS… (or invoke through a link named ray or vllm)")
			return 2
		}
		name, args = args[0], args[1:]
	}
	switch name {
	case "ray":
		return Ray(ctx, args, stdout, stderr)
	case "vllm":
		return VLLM(ctx, args, stdout, stderr)
	case "sglang":
		return SGLang(ctx, args, stdout, stderr)
	default:
		fmt.Fprintf(stderr, "shoal-sim: unknown personality %q: want ray, vllm or sglang\n", name)
		return 2
	}
}
