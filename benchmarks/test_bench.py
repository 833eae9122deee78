"""pytest-benchmark suite: every op and the model-level ALTER steps, each variant of a
case timed in the same run so that ratios to the eager path are meaningful.

    pytest benchmarks/                      # CPU shapes on a CPU, Llama-3-8B shapes on a GPU
    ALTER_BENCH_QUICK=1 pytest benchmarks/  # CI sizes
    alter bench                              # runs this suite and prints one table

Timings are reported, never asserted.
"""
import os

import pytest
import torch

from alter.bench import all_cases, bench_device, measure_ceilings, peak_memory_bytes
from alter_kernels._dispatch import BACKENDS, unavailable_reason

QUICK = os.environ.get("ALTER_BENCH_QUICK", "0") == "1"
DEVICE = bench_device()
ROUNDS = 2 if QUICK else (20 if DEVICE.type == "cuda" else 5)
CASES = all_cases(DEVICE, QUICK)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize(
    "case,index,variant",
    [pytest.param(c, i, v, id=f"{c.name}::{v}") for c in CASES for i, v in enumerate(c.variants)],
)
def test_bench(benchmark, case, index, variant):
    if variant in BACKENDS:
        why = unavailable_reason(variant, DEVICE)
        if why:
            pytest.skip(f"{variant} on {DEVICE.type}: {why}")
    # memory first: it builds its own inputs (in a subprocess on the CPU) and frees them
    peak_bytes = peak_memory_bytes(case, variant, DEVICE, QUICK)
    step = case.build(variant, DEVICE)

    def run():
        step()
        _sync()

    benchmark.group = case.name
    benchmark.pedantic(run, warmup_rounds=2 if DEVICE.type == "cuda" else 1, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        case=case.name,
        group=case.group,
        variant=variant,
        variant_index=index,
        peak_bytes=peak_bytes,
        tokens=case.tokens,
        bytes_moved=case.bytes_moved,
        flops=case.flops,
    )


def test_ceilings(benchmark):
    """Roofline ceilings, measured in the same run as the ops (GPU only)."""
    if DEVICE.type != "cuda":
        pytest.skip("roofline ceilings are measured on a GPU only")
    ceilings = measure_ceilings(DEVICE)
    benchmark.extra_info["ceilings"] = ceilings
    benchmark.pedantic(lambda: None, rounds=1)
