// Package coordinator keeps deployments in a bbolt store, forms replica groups
// from healthy idle nodes seen in gossip, tells agents their assignments,
// watches each head's Replica API and feeds the router's endpoint table.
// Serving does not depend on it: heads keep serving while it is down.
package coordinator
