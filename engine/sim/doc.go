// Package sim is shoal-sim: a stand-in for `ray` and `vllm` on machines where
// they cannot be installed. It takes the same command lines, speaks the same
// wire formats (OpenAI HTTP/SSE, vLLM's /metrics names) and fails the way they
// fail (docs/design/simulator.md §C3), so the agent runs it through exactly
// the code path it uses for the real binaries.
//
// Knobs that real vLLM does not have come from SHOAL_SIM_* environment
// variables, never from flags, so the argv stays byte-for-byte the real one:
//
//	SHOAL_SIM_TIME_SCALE   virtual seconds per real second (default 1)
//	SHOAL_SIM_LOAD_SECONDS weight-load time before listening, virtual s (default 5)
//	SHOAL_SIM_GPUS         GPUs visible on this host (default 8)
//	SHOAL_SIM_STATE_DIR    where `ray start` leaves pid files for `ray stop`
package sim
