"""The zoo table (benchmarks/zoo/QUALITY.md): ALTER and every method on its other
parameterizations (alter.quality.ZOO_RUNS), the held-out scenarios, seeds 500 and 501;
`alter quality --zoo` runs the same runs plus every method on its default params.

    OMP_NUM_THREADS=1 python benchmarks/zoo/run_zoo.py    # ~36 min on 2 busy cores
"""
import json
import os
import time

from alter.config import AlterConfig
from alter.data.scenarios import HELD_OUT
from alter.quality import RELEARN, ZOO_RUNS, run_suite
from alter.quality_report import summarize, write_report

if __name__ == "__main__":
    out = os.path.dirname(os.path.abspath(__file__))
    seeds = [500, 501]
    t0 = time.perf_counter()
    results = run_suite(HELD_OUT, seeds, runs=("alter",) + ZOO_RUNS, workers=2)
    with open(os.path.join(out, "QUALITY.json"), "w") as f:
        json.dump({"scenarios": [s.to_dict() for s in HELD_OUT], "seeds": seeds, "quick": False,
                   "default_config": AlterConfig().to_dict(), "relearn": RELEARN, "zoo": list(ZOO_RUNS),
                   "seconds": time.perf_counter() - t0, "summary": summarize(results), "results": results}, f, indent=1)
    write_report(out)
    print("done", time.perf_counter() - t0)
