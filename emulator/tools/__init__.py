"""Tools built on the runtime and the client: benchmarks, the live-server fuzzer, the soak."""
