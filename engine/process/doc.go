// Package process runs engine commands as bare processes, each in its own
// process group, with stdout and stderr appended to a per-engine log file. Stop
// sends SIGTERM to the group, waits a grace period, then SIGKILLs the group, so
// children an engine spawned (Ray's raylet, vLLM's workers) go with it.
package process
