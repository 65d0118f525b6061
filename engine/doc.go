// Package engine turns a deployment's engine section into a per-role launch plan:
// the exact argv and environment a real Ray/vLLM installation would get. The plan
// does not run anything; a runtime (engine/process) runs it, and the simulator
// (engine/sim) stands in for the binaries where they cannot be installed.
package engine
