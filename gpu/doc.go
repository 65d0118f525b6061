// Package gpu fingerprints a host's GPUs through NVML (github.com/NVIDIA/go-nvml).
// A host without a driver is a state, not an error: the Null inspector reports
// zero GPUs. The mock backend (mock:h200x8) runs go-nvml's dgxh200 mock through
// the same NVML code path, so dev clusters and tests exercise the real reader.
package gpu
