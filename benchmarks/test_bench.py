"""pytest-benchmark suite: every op and the model-level ALTER steps, each variant of a
case timed in the same run so that ratios to the eager path are meaningful.

    pytest benchmarks/                      # CPU shapes on a CPU, Llama-3-8B shapes on a GPU
    ALTER_BENCH_QUICK=1 pytest benchmarks/  # CI sizes, two rounds
    python benchmarks/harness.py            # runs this suite and prints one table (alter bench)

Each result carries its peak memory (see ``harness.py``) in ``extra_info``. Timings are
reported, never asserted.
"""
import os
import time
from functools import lru_cache

import pytest

from bench_cases import bench_device, synchronize, variant_unavailable
from bench_budget import rounds
from harness import DEADLINE_ENV, all_cases, cpu_peak_memory_bytes, cuda_peak_memory_bytes, measure_ceilings

QUICK = os.environ.get("ALTER_BENCH_QUICK", "0") == "1"
DEVICE = bench_device()
CASES = all_cases(DEVICE, QUICK)
DEADLINE = float(os.environ.get(DEADLINE_ENV) or "inf")


@lru_cache(maxsize=None)
def _cpu_peaks(case) -> dict:
    """Every variant of a case in one memory subprocess: one process start per case."""
    return cpu_peak_memory_bytes(case, QUICK)


def test_ceilings(benchmark):
    """Roofline ceilings, measured first, in the same run as the ops (GPU only)."""
    if DEVICE.type != "cuda":
        pytest.skip("roofline ceilings are measured on a GPU only")
    benchmark.extra_info["ceilings"] = measure_ceilings(DEVICE)
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.parametrize(
    "case,index,variant",
    [pytest.param(c, i, v, id=f"{c.name}::{v}") for c in CASES for i, v in enumerate(c.variants)],
)
def test_bench(benchmark, case, index, variant):
    started = time.perf_counter()
    if time.time() > DEADLINE:
        pytest.skip("the time budget (alter bench --budget) is spent")
    why = variant_unavailable(variant, DEVICE)
    if why:
        pytest.skip(f"{variant} on {DEVICE.type}: {why}")
    # memory first: it builds its own inputs and frees them (in a subprocess on the CPU)
    if DEVICE.type == "cuda":
        peak_bytes = cuda_peak_memory_bytes(case, variant, DEVICE)
    else:
        peak_bytes = _cpu_peaks(case)[variant]
    step = case.build(variant, DEVICE)

    def run():
        step()
        synchronize(DEVICE)

    benchmark.group = case.name
    warmup, timed = rounds(case, DEVICE, QUICK)
    benchmark.pedantic(run, warmup_rounds=warmup, rounds=timed, iterations=1)
    benchmark.extra_info.update(
        case=case.name,
        group=case.group,
        variant=variant,
        variant_index=index,
        peak_bytes=peak_bytes,
        tokens=case.tokens,
        bytes_moved=case.bytes_moved,
        flops=case.flops,
        seconds=time.perf_counter() - started,  # memory and timing: the cost alter bench --budget chooses by
    )
