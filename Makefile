# `make demo` and `make test` work on a fresh machine: they build .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CSRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h)

.PHONY: install demo test bench bench-ci compile-report quality quality-quick clean

install: $(STAMP)

$(STAMP): setup.py requirements-dev.txt $(CSRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a CPU wheel on disk; a bare
	# `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/alter demo --out demo_out

# The held-out scenario suite against its oracles, every method (ALTER's ablations only with
# `alter quality --ablations`): benchmarks/QUALITY.md, .json, .png.
quality: $(STAMP)
	$(VENV)/bin/alter quality --out benchmarks

# CI: the suite at smoke sizes, into a scratch folder; asserts nothing about quality.
quality-quick: $(STAMP)
	$(VENV)/bin/alter quality --quick --out quality_out

# One thread per xdist worker: two workers already fill a 2-core machine.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 -q

# The benchmark harness (alter bench runs the same from a source checkout).
bench: $(STAMP)
	$(PY) benchmarks/harness.py --out bench_out

# The CPU suite at CI sizes, so the benchmarks cannot rot (timings printed only), then the
# regression guard: fails when the dispatcher's choice is > 25% slower than eager on a
# model-level case (ratios within the run; bench_out/regression.json).
bench-ci: $(STAMP)
	$(PY) benchmarks/harness.py --quick --out bench_out
	$(PY) benchmarks/regression.py --out bench_out

# Every Triton kernel compiled offline for sm_90 and sm_80 at the benchmark shapes (no GPU
# needed); fails on a compile error, a spill or more than 168 registers.
compile-report: $(STAMP)
	$(PY) benchmarks/compile_report.py --arch 90 80 --out bench_out

clean:
	rm -rf $(VENV) build *.egg-info alter_kernels/_C*.so demo_out bench_out quality_out
