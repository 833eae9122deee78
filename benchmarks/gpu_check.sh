#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the extension with its CUDA
# kernels, run the kernel tests on CUDA (bf16 included, no interpreter), then the
# benchmark suite at Llama-3-8B shapes. Logs and tables go under OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR        (about 6-8 minutes on an H100/H200)
#
# It uses the machine's own python3 and packages (torch, triton, transformers,
# pytest, pytest-benchmark, pytest-xdist); nothing is downloaded.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  echo "== build"
  # --no-deps: the machine has no network; its own packages are used.
  time $PY -m pip install --no-build-isolation --no-deps -e .
  $PY -c "import alter_kernels; print(alter_kernels.available_backends('cuda'))"
} > "$OUT/build.log" 2>&1 || { echo "build failed: see $OUT/build.log"; status=1; }
tail -3 "$OUT/build.log"

echo "== kernel tests on CUDA"
ALTER_TEST_CUDA=1 timeout 240 $PY -m pytest -q -n 4 \
  tests/test_entropy.py tests/test_ihl.py tests/test_routing.py tests/test_asym_lora.py tests/test_cpp_extension.py \
  2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
timeout 330 $PY -m alter.bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
