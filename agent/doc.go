// Package agent is the daemon on every GPU host: it fingerprints the GPUs, joins
// the gossip cluster with compact tags, persists its assignment, elects or
// follows its replica group's head, runs the engine processes for its role and
// serves the Agent gRPC API (and, while head, the Replica API).
//
// Agent is the one wiring point. The election rule (election.go) and the tag
// codec (tags.go) are pure so they can be table-tested; the supervisor
// (supervisor.go) is the single goroutine that changes engine state.
package agent
