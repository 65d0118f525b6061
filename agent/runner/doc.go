// Package runner owns one engine run: one (group, epoch, term) in one role
// on one node. A Runner starts the plan's processes in order (weights, the
// node process, the head's GPU gate, the server), supervises them (exits,
// readiness, metrics, hangs, the idle canary, a head's polls of its
// members) and stops them. It owns every goroutine it starts and its
// process or container handles; no lock is held across I/O.
//
// Two ways end a run, as in Nomad's task runner: Stop kills the engine
// ("stop this engine"), Detach only ends the supervision and leaves the
// engine running ("the agent is exiting"; the next agent process adopts it).
// Both return at once; Done is closed when the runner is finished.
//
// The agent's supervisor (package agent) creates runners, reads their
// Status when Notify wakes it, and decides; a runner never changes the
// agent's state itself.
package runner
