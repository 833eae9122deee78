"""The regression guard's decision (benchmarks/regression.py) on made-up timings: paired
ratios within one repeat, the median over repeats, the 25% limit, and the interleaving."""
import sys
from pathlib import Path

import pytest
import torch

# The guard is a script of the benchmark folder, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from regression import LIMIT, case_ratios, time_repeats, verdict  # noqa: E402


def test_ratio_is_the_median_of_paired_repeats():
    # load rises during the run: each repeat's pair is slower, their ratio is not
    times = {"eager": [1.0, 2.0, 4.0, 8.0, 16.0], "kernels": [0.5, 1.0, 2.0, 4.0, 8.0], "base": [0.25] * 5}
    assert case_ratios(times) == {"kernels": 0.5, "base": 0.0625}
    assert verdict(times) is None


def test_one_slow_repeat_does_not_fail_but_a_slow_median_does():
    noisy = {"eager": [1.0] * 5, "kernels": [1.0, 1.1, 9.0, 1.0, 1.2]}  # one burst of load
    assert verdict(noisy) is None
    slow = {"eager": [1.0] * 5, "kernels": [1.3, 1.4, 0.9, 1.3, 1.5]}
    assert case_ratios(slow)["kernels"] == pytest.approx(1.3)
    assert "1.30x the eager time" in verdict(slow)


def test_the_limit_is_25_percent():
    assert LIMIT == 1.25
    assert verdict({"eager": [1.0] * 5, "kernels": [1.25] * 5}) is None
    assert verdict({"eager": [1.0] * 5, "kernels": [1.26] * 5}) is not None


def test_repeats_interleave_with_the_order_flipped_each_round():
    order = []
    steps = {v: (lambda v=v: order.append(v)) for v in ("eager", "kernels")}
    times = time_repeats(steps, 3, torch.device("cpu"))
    assert order == ["eager", "kernels", "kernels", "eager", "eager", "kernels"]
    assert [len(t) for t in times.values()] == [3, 3]
    time_repeats(steps, 2, torch.device("cpu"), times)  # a confirmation round appends
    assert [len(t) for t in times.values()] == [5, 5]
