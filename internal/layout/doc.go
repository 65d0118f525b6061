// Package layout holds no code: its test enforces the repository's import
// rules (docs/architecture.md §8) and that no file points outside the
// repository. `make lint` and `make test` run it.
package layout
