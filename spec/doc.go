// Package spec owns the deployment spec users write in YAML and apply with
// `shoal apply -f`: its types, strict decoding, defaults and validation. Every
// error names the field it is about, so a user can fix the file without reading
// code. Fields shoal accepts but does not act on yet are listed by Fields with
// Implemented=false, so `shoal describe` can say so instead of ignoring them.
package spec
