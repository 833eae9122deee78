"""Regression guard of the model-level cases (``make bench-ci``, so CI): the dispatcher's
choice (``kernels``) must not be more than 25% slower than the eager path on any of them.

    python benchmarks/regression.py --out bench_out     # writes bench_out/regression.json

Built for a noisy shared 2-core machine: one torch thread; every variant of a case is
built and warmed up first, then timed in 5 interleaved repeats (the order flips each
repeat, so a drift in load hits every variant alike); each repeat gives the ratio of
``kernels`` to ``eager`` measured seconds apart, and the case's ratio is the median of
those. A case over the limit is timed 5 more times and judged on all 10 ratios, so one
burst of load cannot fail CI. Only ratios within one run are compared, never absolute
times. Exit status 1 when a case is over the limit, 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_cases import BenchCase, synchronize
from bench_models import model_cases

REPEATS = 5
# kernels may take at most this times the eager path's time on a model-level case
LIMIT = 1.25
CHOICE, REFERENCE = "kernels", "eager"


def paired_ratios(times: dict[str, list[float]], variant: str, reference: str) -> list[float]:
    """Per repeat: ``variant``'s time over ``reference``'s (both lists in repeat order)."""
    return [t / r for t, r in zip(times[variant], times[reference])]


def case_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median paired ratio of every variant to the eager path (time ratios: < 1 is faster)."""
    return {v: statistics.median(paired_ratios(times, v, REFERENCE)) for v in times if v != REFERENCE}


def verdict(times: dict[str, list[float]], limit: float = LIMIT) -> str | None:
    """Why the dispatcher's choice fails the guard on one case, or None when it passes."""
    ratio = case_ratios(times)[CHOICE]
    if ratio > limit:
        return f"{CHOICE} takes {ratio:.2f}x the eager time (median of {len(times[CHOICE])} paired repeats; limit {limit}x)"
    return None


def time_repeats(steps: dict, repeats: int, device: torch.device, times: dict[str, list[float]] | None = None):
    """Time ``repeats`` interleaved rounds of every step, appended to ``times``."""
    times = times if times is not None else {v: [] for v in steps}
    order = list(steps)
    for i in range(repeats):
        for variant in order if i % 2 == 0 else order[::-1]:
            synchronize(device)
            start = time.perf_counter()
            steps[variant]()
            synchronize(device)
            times[variant].append(time.perf_counter() - start)
    return times


def guard_case(case: BenchCase, device: torch.device) -> dict:
    """Time one case and judge it: {case, ratios, times, failure}."""
    steps = {v: case.build(v, device) for v in case.variants}
    for step in steps.values():
        step()  # warm-up: optimizer state, caches, first-call allocations
    times = time_repeats(steps, REPEATS, device)
    if verdict(times) is not None:  # confirm on 5 more repeats before failing
        time_repeats(steps, REPEATS, device, times)
    return {"case": case.name, "ratios": case_ratios(times), "times_s": times, "failure": verdict(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out", help="folder for regression.json")
    parser.add_argument("--full", action="store_true", help="the full CPU sizes instead of the CI sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: steadier on a shared machine; ratios within the run
    device = torch.device("cpu")
    start = time.perf_counter()
    results = []
    # the cases that time the dispatcher's choice against eager (not the step-cost case)
    for case in (c for c in model_cases(device, quick=not args.full) if {CHOICE, REFERENCE} <= set(c.variants)):
        result = guard_case(case, device)
        results.append(result)
        ratios = ", ".join(f"{v} {r:.2f}x" for v, r in result["ratios"].items())
        print(f"{'FAIL' if result['failure'] else 'ok  '}  {case.name}: time over eager: {ratios}"
              + (f"  ({result['failure']})" if result["failure"] else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"limit": LIMIT, "repeats": REPEATS, "seconds": time.perf_counter() - start,
               "torch": torch.__version__, "cases": results}
    (out / "regression.json").write_text(json.dumps(summary, indent=2))
    failed = [r["case"] for r in results if r["failure"]]
    print(f"regression guard: {len(results) - len(failed)}/{len(results)} cases within {LIMIT}x of eager "
          f"in {summary['seconds']:.0f} s; wrote {out / 'regression.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
