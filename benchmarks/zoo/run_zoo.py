"""The zoo table (benchmarks/zoo/QUALITY.md): ALTER and every method on its other
parameterizations (alter.quality.ZOO_RUNS), the held-out scenarios, seeds 500-504;
`alter quality --zoo` runs the same runs plus every method on its default params.

    OMP_NUM_THREADS=1 python benchmarks/zoo/run_zoo.py                  # ~1.5 h on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/zoo/run_zoo.py --add 502 503    # seeds added to QUALITY.json

``--add`` keeps the seeds already in QUALITY.json and runs only the new ones (a seed's
rows do not depend on the other seeds), so the table can grow in pieces on a busy machine.
"""
import argparse
import json
import os
import time

from alter.config import AlterConfig
from alter.data.scenarios import HELD_OUT, HELD_OUT_SEEDS
from alter.quality import RELEARN, ZOO_RUNS, run_suite
from alter.quality_report import summarize, write_report


def write(out: str) -> None:
    """QUALITY.md and the trade-off plot from QUALITY.json, under the zoo's title."""
    write_report(out, title="Unlearning quality: every method on its other parameterizations (the zoo), held-out "
                 "scenarios, against an oracle",
                 produced_by="`benchmarks/zoo/run_zoo.py` (ALTER and `alter.quality.ZOO_RUNS`: each method as "
                 "`method@params`; each method on its default params: `benchmarks/QUALITY.md`), runs on 2 cores "
                 "shared with other work,")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--add", type=int, nargs="+", help="seeds to add to the existing QUALITY.json")
    cli = parser.parse_args()
    out = os.path.dirname(os.path.abspath(__file__))
    record_path = os.path.join(out, "QUALITY.json")
    previous = {"seeds": [], "results": [], "seconds": 0.0}
    if cli.add:
        with open(record_path) as f:
            previous = json.load(f)
        clash = sorted(set(cli.add) & set(previous["seeds"]))
        if clash:
            raise SystemExit(f"seeds {clash} are already in {record_path}")
    seeds = cli.add or list(HELD_OUT_SEEDS)
    t0 = time.perf_counter()
    results = previous["results"] + run_suite(HELD_OUT, seeds, runs=("alter",) + ZOO_RUNS, workers=2)
    seeds = sorted(previous["seeds"] + seeds)
    seconds = previous["seconds"] + time.perf_counter() - t0
    with open(record_path, "w") as f:
        json.dump({"scenarios": [s.to_dict() for s in HELD_OUT], "seeds": seeds, "quick": False,
                   "default_config": AlterConfig().to_dict(), "relearn": RELEARN, "zoo": list(ZOO_RUNS),
                   "seconds": seconds, "summary": summarize(results), "results": results}, f, indent=1)
    write(out)
    print("done", time.perf_counter() - t0)
