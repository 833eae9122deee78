"""The tofu_mini table of the zoo (benchmarks/zoo/TOFU_MINI.md): every method on every
parameterization it supports (its default, then ``alter.quality.ZOO_RUNS``), the demo's
pipeline (``alter.demo``: tofu_mini, a tiny Llama, forget quality against the retain
model's truth ratios, model utility), seeds 0-4, mean ± std.

    OMP_NUM_THREADS=1 python benchmarks/zoo/run_tofu_mini.py           # ~25 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/zoo/run_tofu_mini.py --quick   # smoke sizes, not a result
"""
import argparse
import json
import os
import time

from alter.demo import DEMO_SEEDS, run_demo
from alter.methods import METHODS
from alter.quality import ZOO_RUNS

PAIRS = METHODS + ZOO_RUNS


def format_markdown(record: dict, quick: bool) -> str:
    """The table: one row per run, mean ± std over seeds, utility also as a ratio of the target's."""
    rows = record["rows"]
    target = next(r for r in rows if r["method"] == "target")
    lines = ["# tofu_mini: every method on every parameterization it supports", "",
             f"Produced by `benchmarks/zoo/run_tofu_mini.py` in {record['minutes']:.1f} min on 2 cores shared with "
             f"other work{' (--quick: smoke sizes, not a result)' if quick else ''}. Seeds "
             f"{', '.join(map(str, record['seeds']))}; mean ± std over seeds. The demo's pipeline (`alter.demo`, "
             "`make demo`): tofu_mini's fictitious authors, a tiny Llama that memorizes every split (the **target**) "
             "and one that never saw the forget split (**retain**, the oracle); each run is "
             "`alter.unlearn(model, tokenizer, forget, retain, method=M, params=P)` with nothing else. "
             "**forget quality**: TOFU's KS-test p-value of the forget set's truth ratios against the retain "
             "model's (high: like the oracle); **utility**: TOFU's model utility (harmonic mean over the retain, "
             "real-authors and world-facts splits), and as a ratio of the target's; method names without `@` run on "
             "the method's default params (README, method table). The issue's tofu_mini target for ALTER: forget "
             "quality >= 0.5 at utility >= 0.95x the target's.", "",
             "| run | forget quality | model utility | utility / target | forget ROUGE | retain ROUGE | s/run |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        name = f"**{row['method']}**" if row["method"] == "alter" else row["method"]
        ratio = row["model_utility"] / target["model_utility"]
        lines.append(f"| {name} | {row['forget_quality']:.3g} ± {row['forget_quality_std']:.2g} | "
                     f"{row['model_utility']:.3f} ± {row['model_utility_std']:.3f} | {ratio:.2f} | "
                     f"{row['forget_rouge']:.3f} ± {row['forget_rouge_std']:.3f} | "
                     f"{row['retain_rouge']:.3f} ± {row['retain_rouge_std']:.3f} | {row['time_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (one seed, 4 steps a run)")
    cli = parser.parse_args()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tofu_mini")
    t0 = time.perf_counter()
    run_demo(out, quick=cli.quick, methods=PAIRS)
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)
    record["minutes"] = (time.perf_counter() - t0) / 60
    with open(os.path.join(os.path.dirname(out), "TOFU_MINI.md"), "w") as f:
        f.write(format_markdown(record, cli.quick))
    print("done", record["minutes"], "min; seeds", DEMO_SEEDS if not cli.quick else DEMO_SEEDS[:1])
