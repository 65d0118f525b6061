// Package console is the coordinator's web console (docs/design/console.md):
// the cluster, its deployments, a replica's logs and load, and a playground,
// as pages a person can look at. Every figure comes from the coordinator API
// the CLI uses (a coordv1.CoordinatorClient), and each view has a JSON
// endpoint under /api/ that scripts can read. The static assets are
// embedded; there is no build step.
//
// The console owns one goroutine (Run): it samples replica load for the
// charts, weight-pull progress for the rates and ETAs, and the agents' GPU
// inventories (refreshed when a node's health changes), so that a page never
// waits on a thousand agents.
package console
