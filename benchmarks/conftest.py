"""Setup of the benchmark suite: it times real kernels, so the Triton interpreter is
refused on a GPU, GPU memory left over by one case is released before the next (the
eager logits cases hold tens of GB of temporaries at Llama-3 sizes), and under
``alter bench --budget`` only the cases the budget chose are collected."""
import gc
import json
import os

import pytest
import torch
from bench_cases import bench_device
from harness import CASES_ENV

from alter_kernels import available_backends


def pytest_configure(config):
    if bench_device().type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError(
            "benchmarks/: TRITON_INTERPRET is set, so Triton would run in the interpreter; unset it "
            "(and run benchmarks/ apart from tests/, whose conftest sets it)"
        )


def pytest_collection_modifyitems(config, items):
    """Deselect the cases the budget left out (``CASES_ENV``; unset: every case)."""
    if os.environ.get(CASES_ENV) is None:
        return
    chosen = set(json.loads(os.environ[CASES_ENV]))

    def kept(item) -> bool:
        callspec = getattr(item, "callspec", None)
        return callspec is None or "case" not in callspec.params or callspec.params["case"].name in chosen

    config.hook.pytest_deselected(items=[item for item in items if not kept(item)])
    items[:] = [item for item in items if kept(item)]


def pytest_report_header(config):
    device = bench_device()
    quick = os.environ.get("ALTER_BENCH_QUICK", "0") == "1"
    usable = [name for name, why in available_backends(device).items() if why is None]
    return f"alter bench: device {device}, {'quick' if quick else 'full'} sizes, backends {usable}"


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
