"""ALTER's default call against the same call with ``AlterConfig(routing="sequence")``
(docs/routing.md, "(e) The sequence route"), on the held-out scenarios and seeds (or the
development ones), into ``benchmarks/sequence_route/QUALITY.md`` (the suite's columns,
with the paired comparison of the two).

    OMP_NUM_THREADS=1 python benchmarks/sequence_route.py [--development] [--workers 2]
    OMP_NUM_THREADS=1 python benchmarks/sequence_route.py --development --scenarios dev-authors-text --seeds 0
"""
import argparse
import json
import os
import time

from alter.config import AlterConfig
from alter.data.scenarios import DEVELOPMENT, DEVELOPMENT_SEEDS, HELD_OUT, HELD_OUT_SEEDS
from alter.quality import RELEARN, run_suite
from alter.quality_report import summarize, write_report

RUNS = ("alter", "alter-sequence-route")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--development", action="store_true", help="development scenarios and seeds")
    parser.add_argument("--scenarios", help="comma-separated scenario names of the chosen split (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the split's)")
    parser.add_argument("--workers", type=int, default=2)
    cli = parser.parse_args()
    scenarios, seeds = (DEVELOPMENT, DEVELOPMENT_SEEDS) if cli.development else (HELD_OUT, HELD_OUT_SEEDS)
    if cli.scenarios:
        names = cli.scenarios.split(",")
        scenarios = [s for s in scenarios if s.name in names]
        if len(scenarios) != len(names):
            raise SystemExit(f"--scenarios: not all of {names} are in the chosen split")
    if cli.seeds:
        seeds = tuple(int(s) for s in cli.seeds.split(","))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "sequence_route" + ("_development" if cli.development else ""))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    results = run_suite(scenarios, seeds, runs=RUNS, workers=cli.workers)
    with open(os.path.join(out, "QUALITY.json"), "w") as f:
        json.dump({"scenarios": [s.to_dict() for s in scenarios], "seeds": list(seeds), "quick": False,
                   "default_config": AlterConfig().to_dict(), "relearn": RELEARN, "runs": list(RUNS),
                   "seconds": time.perf_counter() - t0, "summary": summarize(results), "results": results}, f, indent=1)
    write_report(out, title="Token routing (the default) against the sequence route, against an oracle",
                 produced_by="`benchmarks/sequence_route.py`")
    print("done", time.perf_counter() - t0)
