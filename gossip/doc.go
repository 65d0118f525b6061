// Package gossip is cluster membership over hashicorp/memberlist: the compact
// tag every node advertises (tags.go) and the Membership that joins the cluster,
// publishes the local tag, rejects peers from other clusters or with bad tags,
// and hands membership changes to its owner without ever blocking memberlist's
// callbacks. Agents, the coordinator and routers all use it; it imports nothing
// hardware-related, so the coordinator stays free of go-nvml.
package gossip
