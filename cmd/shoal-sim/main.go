// Command shoal-sim stands in for ray and vllm where they cannot be installed.
// Link it as `ray` and `vllm`, or run `shoal-sim ray …` / `shoal-sim vllm …`.
package main

import (
	"context"
	"os"

	"github.com/shoalhq/shoal/engine/sim"
)

func main() {
	os.Exit(sim.Main(context.Background(), os.Args, os.Stdout, os.Stderr))
}
