"""The time budget of ``alter bench --budget SECONDS``: which cases fit.

Each case's cost is the seconds it took in earlier runs into the same ``--out``
(:data:`COSTS_FILE`, recorded by :func:`record_costs` from the suite's results) or, for a
case never run there, an estimate from one build and one call of its baseline
(:func:`probe_cost`). :func:`choose_cases` takes, in the suite's order, each case whose
cost fits in what is left of the budget.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch
from bench_cases import BenchCase, synchronize

# Each case's seconds in earlier runs of this --out ({device/sizes: {case: seconds}}).
COSTS_FILE = "case_costs.json"
# At most this share of a budget goes to probing cases that have no recorded cost.
PROBE_SHARE = 0.25
# A fresh Python process importing torch (the CPU memory subprocess of every case).
SUBPROCESS_S = 3.0


def rounds(case: BenchCase, device: torch.device, quick: bool) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) of each variant of ``case``."""
    timed = 2 if quick else (10 if case.model_level else 20) if device.type == "cuda" else 5
    return (2 if device.type == "cuda" else 1), timed


def probe_cost(case: BenchCase, device: torch.device, quick: bool) -> float:
    """Estimated seconds of ``case`` in the suite from one build and one call of its
    baseline: every variant builds twice (memory, timing) and runs its rounds plus the two
    calls of the memory measurement; on the CPU the memory subprocess starts once."""
    started = time.perf_counter()
    step = case.build(case.variants[0], device)
    built = time.perf_counter()
    step()
    synchronize(device)
    build_s, call_s = built - started, time.perf_counter() - built
    del step
    gc.collect()
    warmup, timed = rounds(case, device, quick)
    per_variant = 2 * build_s + (warmup + timed + 2) * call_s
    return len(case.variants) * per_variant + (SUBPROCESS_S if device.type == "cpu" else 0.0)


def choose_cases(cases: list[BenchCase], costs: dict[str, float], seconds: float, estimate) -> tuple[dict, dict]:
    """The cases that fit in ``seconds``: each case's cost is its recorded one (``costs``)
    or, for a case without, ``estimate(case)`` (a probe, whose own time counts too, while
    probes have used less than :data:`PROBE_SHARE` of the budget). In the suite's order,
    a case is taken when its cost fits in what is left, so a long case left out does not
    keep the shorter ones after it out. Returns ({chosen: cost}, {left out: cost or None
    when not probed})."""
    deadline = time.perf_counter() + seconds
    probe_until = time.perf_counter() + PROBE_SHARE * seconds
    known = {}
    for case in cases:
        if case.name in costs:
            known[case.name] = costs[case.name]
        elif time.perf_counter() < probe_until:
            known[case.name] = estimate(case)
        else:
            known[case.name] = None
    left = deadline - time.perf_counter()
    chosen, left_out = {}, {}
    for case in cases:
        cost = known[case.name]
        if cost is not None and cost <= left:
            chosen[case.name] = cost
            left -= cost
        else:
            left_out[case.name] = cost
    return chosen, left_out


def matches(expression: str, case: BenchCase) -> bool:
    """Whether pytest's ``-k expression`` selects any variant of ``case`` (its test ids are
    ``test_bench[CASE::VARIANT]``), matched as pytest matches: case-insensitive substrings."""
    from _pytest.mark.expression import Expression  # pytest's own -k grammar (and, or, not)

    names = ["test_bench.py", "test_bench"]
    compiled = Expression.compile(expression)
    return any(compiled.evaluate(lambda word, variant=variant: any(
        word.lower() in name.lower() for name in names + [f"test_bench[{case.name}::{variant}]"]))
        for variant in case.variants)


def _costs_key(device: torch.device, quick: bool) -> str:
    return f"{device.type}/{'quick' if quick else 'full'}"


def read_costs(out: Path, device: torch.device, quick: bool) -> dict[str, float]:
    path = out / COSTS_FILE
    return json.loads(path.read_text()).get(_costs_key(device, quick), {}) if path.exists() else {}


def record_costs(out: Path, device: torch.device, quick: bool, benchmarks: list[dict]) -> None:
    """Each case that ran: the sum of its variants' seconds, merged into :data:`COSTS_FILE`."""
    path = out / COSTS_FILE
    recorded = json.loads(path.read_text()) if path.exists() else {}
    measured: dict[str, float] = {}
    for b in benchmarks:
        info = b["extra_info"]
        if "case" in info and "seconds" in info:
            measured[info["case"]] = measured.get(info["case"], 0.0) + info["seconds"]
    recorded.setdefault(_costs_key(device, quick), {}).update(measured)
    path.write_text(json.dumps(recorded, indent=2))


def budget_line(chosen: dict, left_out: dict, seconds: float) -> str:
    """What the budget chose, for the table's header."""
    text = (f"budget {seconds:.0f} s: {len(chosen)} of {len(chosen) + len(left_out)} cases chosen "
            f"(estimated {sum(chosen.values()):.0f} s)")
    if left_out:
        text += "; left out: " + ", ".join(
            f"{name} ({'not probed' if cost is None else f'~{cost:.0f} s'})" for name, cost in left_out.items())
    return text
