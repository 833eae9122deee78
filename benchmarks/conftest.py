"""The benchmark suite runs real kernels: no Triton interpreter here (on a CPU the
suite benchmarks the eager path against the compiled extension)."""
