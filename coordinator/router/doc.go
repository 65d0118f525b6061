// Package router serves the OpenAI HTTP API and proxies each request to one
// SERVING replica head of the requested model, picked by a strategy chosen per
// request with the `routing-strategy` header. It reads an immutable endpoint
// snapshot (copy-on-write) and makes no network call other than to the chosen
// backend: no store, no coordinator round trip on the hot path.
package router
