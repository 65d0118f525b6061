// Package model fetches model weights to a host's disk and checks them.
//
// Sources are hf://org/name[@revision], s3://bucket/prefix (any S3-compatible
// endpoint), gs://bucket/prefix and local or shared paths, which are used in
// place and only checked for completeness. A pull lists the source, keeps the
// files the filter selects, and fetches them with a pool of workers over
// ranged parts of every file at once. Partial data lives under
// <dir>/.shoal/partial with a progress record that makes an interrupted pull
// resume at the byte it reached; a finished file is verified (size, and MD5,
// SHA-256 or git blob hash where the source gives one) and renamed into place,
// and the model is marked complete only when every file is. A per-directory
// lock lets agents and containers share one copy per host.
package model
