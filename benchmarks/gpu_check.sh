#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the extension in place (with its
# CUDA kernels when nvcc is found), run the kernel tests on CUDA (bf16 included, no
# Triton interpreter), then the benchmark suite at Llama-3-8B shapes. Meanwhile, on the
# CPU, the offline compile report (benchmarks/compile_report.py, sm_90 and sm_80) runs
# in the background: it costs no device time.
#
#   benchmarks/gpu_check.sh OUTDIR        (at most GPU_CHECK_SECONDS, default 450 s: < 8 min)
#
# It uses the machine's own python3 and packages (torch, triton, transformers, pytest,
# pytest-benchmark, pytest-xdist; matplotlib optional); nothing is downloaded or
# installed, and neither `datasets` nor `rouge-score` is needed. Everything runs from
# the source tree. OUTDIR gets at most 9 files:
#   build.log  tests.log  bench.log  bench/{table.txt,results.json,pytest-benchmark.json,bench.png}
#   compile.log  compile/compile_report.json
# The exit status is 0 only when the build, the tests and the suite all succeeded.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-450}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET ALTER_BACKEND ALTER_BENCH_DEVICE
status=0
left() { echo $(( TOTAL - SECONDS )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }

echo "== build (log: $OUT/build.log)"
{
  date -u
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  # In place, not pip: no site-packages write (system pythons refuse it), no network.
  MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 150 $PY setup.py -q build_ext --inplace
  echo "build exit $?"
  $PY -c "import alter_kernels; print('backends on cuda:', alter_kernels.available_backends('cuda'))"
} > "$OUT/build.log" 2>&1
grep -q "^build exit 0$" "$OUT/build.log" || status=1
tail -2 "$OUT/build.log"

# Offline compiles need no GPU: in the background, on the CPU, while the GPU works
# (after the build: the asym_lora backward calls the extension's moe_align on the CPU).
timeout -k 10 300 $PY benchmarks/compile_report.py --arch 90 80 --out "$OUT/compile" > "$OUT/compile.log" 2>&1 &
compile_pid=$!

# The suite gets at least 180 s of what is left.
budget=$(clamp $(( $(left) - 180 )) 30 150)
echo "== kernel tests on CUDA, ${budget} s at most (log: $OUT/tests.log)"
ALTER_TEST_CUDA=1 timeout -s INT -k 15 "$budget" $PY -m pytest -q -n 4 -p no:cacheprovider \
  tests/test_entropy.py tests/test_ihl.py tests/test_routing.py tests/test_asym_lora.py tests/test_cpp_extension.py \
  > "$OUT/tests.log" 2>&1
[ $? -eq 0 ] || status=1
tail -15 "$OUT/tests.log"

# --budget: no case starts in the last 60 s, so the suite ends on its own and writes its table.
limit=$(clamp $(( $(left) - 5 )) 120 600)
echo "== benchmarks, ${limit} s at most (log: $OUT/bench.log)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$limit" $PY benchmarks/harness.py --out "$OUT/bench" --budget $(( limit - 60 )) > "$OUT/bench.log" 2>&1
[ $? -eq 0 ] || status=1
grep -E "passed|failed|error" "$OUT/bench.log" | tail -3
cat "$OUT/bench/table.txt" 2>/dev/null || { echo "no table: see $OUT/bench.log"; tail -30 "$OUT/bench.log"; }
echo "== compile report (log: $OUT/compile.log)"
wait $compile_pid || status=1
tail -25 "$OUT/compile.log"
echo "== done in ${SECONDS} s, status $status"
exit $status
