#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the extension in place (with its
# CUDA kernels when nvcc is found), run the kernel tests on CUDA (bf16 included, no
# Triton interpreter), the decode checks (latency per token, no host sync, CUDA-graph
# capture), then the benchmark suite at Llama-3-8B shapes. Meanwhile, on the
# CPU, the offline compile report (benchmarks/compile_report.py, sm_90 and sm_80) runs
# in the background: it costs no device time.
#
#   benchmarks/gpu_check.sh OUTDIR        (at most GPU_CHECK_SECONDS, default 450 s: < 8 min)
#
# It uses the machine's own python3 and packages (torch, triton, transformers, pytest,
# pytest-benchmark, pytest-xdist; matplotlib optional); nothing is downloaded or
# installed, and neither `datasets` nor `rouge-score` is needed. Everything runs from
# the source tree. OUTDIR gets at most 10 files:
#   build.log  tests.log  decode.log  bench.log  bench/{table.txt,results.json,pytest-benchmark.json,bench.png}
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

# The suite gets at least 180 s of what is left, the decode check 90 s.
budget=$(clamp $(( $(left) - 270 )) 30 150)
echo "== kernel tests on CUDA, ${budget} s at most (log: $OUT/tests.log)"
ALTER_TEST_CUDA=1 timeout -s INT -k 15 "$budget" $PY -m pytest -q -n 4 -p no:cacheprovider \
  tests/test_entropy.py tests/test_ihl.py tests/test_token_losses.py tests/test_routing.py tests/test_asym_lora.py \
  tests/test_gated_asym_lora.py \
  tests/test_cpp_extension.py \
  tests/test_cuda_graph.py > "$OUT/tests.log" 2>&1
[ $? -eq 0 ] || status=1
tail -15 "$OUT/tests.log"

# Decode on the GPU (Llama-3-8B shapes cut to two layers, bf16, batch 4, prompt 128), the
# dispatcher's choice with lagged entropy against the unpatched model: latency per token
# (median of 3 interleaved rounds of 32 steps; target <= 1.15x), no host sync in a patched
# decode step (torch.cuda.set_sync_debug_mode("error"): the unpatched step first, so a sync
# in transformers itself is told apart), and the step captured in a CUDA graph (replay
# equals the eager step; replay latency against the unpatched model's graph).
echo "== decode checks, 90 s at most (log: $OUT/decode.log)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 90 $PY - > "$OUT/decode.log" 2>&1 <<'PYEOF'
import copy, inspect, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
from bench_models import _build_model

dev, steps, failures = torch.device("cuda"), 32, []
built = {v: _build_model(dev, False, v, entropy_source="lagged") for v in ("base", "kernels")}
models, ids = {v: b[0].eval() for v, b in built.items()}, built["base"][2][:, :128]
key = "cache" if "cache" in inspect.signature(models["base"].forward).parameters else "past_key_values"

def prefill(model):
    out = model(ids, use_cache=True)
    return getattr(out, key), out.logits[:, -1:].argmax(-1)

def gated_copy(model, cache, lagged):
    """A copy of ``cache`` that a lagged decode step accepts, gated as the prefill left it."""
    copied = copy.deepcopy(cache)
    if lagged is not None:
        model.alter_tracker.lagged.link(copied, lagged)
    return copied

def lagged_of(model):
    tracker = getattr(model, "alter_tracker", None)
    return None if tracker is None else tracker.lagged.entropy

def per_token(model):
    cache, nxt = prefill(model)
    lagged = lagged_of(model)
    for _ in range(3):
        model(nxt, **{key: gated_copy(model, cache, lagged)}, use_cache=True)
    if lagged is not None:
        model.alter_tracker.lagged.link(cache, lagged)  # the warm-up ran on copies
    torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, **{key: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps

with torch.no_grad():
    rounds = [{v: per_token(m) for v, m in models.items()} for _ in range(3)]
    ratio = statistics.median(r["kernels"] / r["base"] for r in rounds)
    base_ms = 1e3 * statistics.median(r["base"] for r in rounds)
    print(f"decode latency per token: base {base_ms:.3f} ms, patched {ratio:.3f}x base (target <= 1.15x)")
    synced = {}
    for variant, model in models.items():  # base first: a sync of transformers' own is not ours
        cache, nxt = prefill(model)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(nxt, **{key: cache}, use_cache=True)
            synced[variant] = False
            print(f"host syncs in a {variant} decode step: none")
        except RuntimeError as exc:
            synced[variant] = True
            print(f"host sync in a {variant} decode step: {str(exc).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if synced["kernels"] and not synced["base"]:
        failures.append("sync")
    replay = {}
    for variant, model in models.items():
        cache, nxt = prefill(model)
        lagged = lagged_of(model)

        def step():  # the lagged entropy is a static input of the graph
            return model(nxt, **{key: gated_copy(model, cache, lagged)}, use_cache=True).logits

        expected = step()
        side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay(); torch.cuda.synchronize()
        same = torch.allclose(captured.float(), expected.float(), rtol=1e-2, atol=1e-2)
        start = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        replay[variant] = (time.perf_counter() - start) / steps
        print(f"CUDA graph of a {variant} decode step: captured, replay {'equals' if same else 'DIFFERS FROM'} "
              f"the eager step, {1e3 * replay[variant]:.3f} ms per replay")
        if not same:
            failures.append(f"graph {variant}")
    print(f"graph replay per token: patched {replay['kernels'] / replay['base']:.3f}x base")
sys.exit(1 if failures else 0)
PYEOF
[ $? -eq 0 ] || status=1
cat "$OUT/decode.log" | grep -v Warning | tail -12

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
