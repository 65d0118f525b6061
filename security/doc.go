// Package security holds shoal's transport security: a private CA and the
// certificates of each role (coordinator, agent, router, cli), mutual TLS for
// every gRPC API with per-method role checks, CLI tokens, and gossip keys.
//
// A role is carried in the certificate as a URI SAN shoal://ROLE/NAME, so a
// peer is authorised by what the CA vouched for, not by where it connects
// from: an agent's certificate cannot call Assign on another agent.
package security
