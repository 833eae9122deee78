"""Summarise outside-check results: per scenario x tag, and paired between two tags.

Reads <out>/<scenario>_s<seed>/<tag>/results.json (as run.py writes them) and prints
markdown tables:

(a) per scenario x tag x method, means over seeds of
    d acc QA / stmt: forget value-token accuracy minus the oracle's (QA and statement phrasings),
    FQ QA / stmt:    forget quality (KS p-value of forget-fact log-probs vs the oracle's),
    retain ratio:    retain QA accuracy / the target's,
    typed QA:        share of greedy answers to forget questions that are a value of the right
                     type, next to the oracle's,
    and how many runs meet all four targets: |d acc QA| <= 0.05, FQ QA >= 0.05,
    FQ stmt >= 0.01, retain ratio >= 0.95 (fixed by the outside tester beforehand);
(b) with --compare A B: over the runs (scenario, seed, method) present in both tags, the
    Wilcoxon signed-rank p (scipy.stats.wilcoxon) and how often A is higher / lower than B
    for FQ QA, FQ stmt and |d acc QA|.

    python benchmarks/outside_check/summary.py --out outside_check_out --compare default floor
"""
import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np
from scipy.stats import wilcoxon

TARGETS = "|d acc QA| <= 0.05, FQ QA >= 0.05, FQ stmt >= 0.01, retain ratio >= 0.95"
MODELS = ("target", "oracle")  # result keys that are not unlearning methods
SKIP = {"meta", "scenario", "seed", "tag", "methods", "config", "config_resolved", "cfg", "n_entities",
        "n_forget_entities", "n_forget_facts", "vocab"} | set(MODELS)


def meets_all(x):
    return abs(x["dacc"]) <= 0.05 and x["fq"] >= 0.05 and x["fqs"] >= 0.01 and x["rr"] >= 0.95


def load(out):
    """One row per (scenario, seed, tag, method); crashes as rows with crash set."""
    rows = []
    for p in sorted(glob.glob(os.path.join(out, "*", "*", "results.json"))):
        tag = os.path.basename(os.path.dirname(p))
        with open(p) as f:
            R = json.load(f)
        o, t = R["oracle"], R["target"]
        for m, r in R.items():
            if m in SKIP or not isinstance(r, dict):
                continue
            # Results written before run.py recorded "config" show it as not recorded.
            cfg = R["config"] if "config" in R else "not recorded"
            row = dict(scenario=R["scenario"], seed=R["seed"], tag=tag, method=m, config=cfg)
            if "crash" in r:
                rows.append(dict(row, crash=r["crash"]))
                continue
            rows.append(dict(row, crash=None,
                             dacc=r["acc_forget_qa"] - o["acc_forget_qa"],
                             dacc_st=r["acc_forget_st"] - o["acc_forget_st"],
                             fq=r["fq_qa"], fqs=r["fq_st"],
                             rr=r["acc_retain_qa"] / t["acc_retain_qa"],
                             typed=r["gen_typed_forget"], typed_oracle=o["gen_typed_forget"]))
    return rows


def table(rows):
    configs = defaultdict(set)
    for x in rows:
        c = x["config"]
        configs[x["tag"]].add("library default" if c is None else c if isinstance(c, str) else json.dumps(c, sort_keys=True))
    for tag, cs in sorted(configs.items()):
        print(f"tag {tag}: config {'; '.join(sorted(cs))}")
    print(f"targets: {TARGETS}\n")
    print("| scenario | tag | method | runs | d acc QA | d acc stmt | FQ QA | FQ stmt | retain ratio "
          "| typed QA (oracle) | meet all |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    groups = defaultdict(list)
    for x in rows:
        groups[(x["scenario"], x["tag"], x["method"])].append(x)
        groups[("all", x["tag"], x["method"])].append(x)
    order = sorted(groups, key=lambda k: (k[0] == "all", k[0], k[1], k[2]))
    for key in order:
        xs = groups[key]
        ok = [x for x in xs if x["crash"] is None]
        n_crash = len(xs) - len(ok)
        crash = f" ({n_crash} crashed)" if n_crash else ""
        if not ok:
            print(f"| {' | '.join(map(str, key))} | {len(xs)}{crash} | " + " | ".join(["—"] * 7) + " |")
            continue

        def mean(k):
            return float(np.mean([x[k] for x in ok]))
        met = sum(meets_all(x) for x in ok)
        print(f"| {' | '.join(map(str, key))} | {len(xs)}{crash} | {mean('dacc'):+.3f} | {mean('dacc_st'):+.3f} "
              f"| {mean('fq'):.3f} | {mean('fqs'):.3f} | {mean('rr'):.3f} "
              f"| {mean('typed'):.2f} ({mean('typed_oracle'):.2f}) | {met}/{len(xs)} |")


def compare(rows, a, b):
    by = {(x["scenario"], x["seed"], x["tag"], x["method"]): x for x in rows if x["crash"] is None}
    methods = sorted({k[3] for k in by if k[2] == a} & {k[3] for k in by if k[2] == b})
    print(f"\n{a} vs {b}, paired over runs (scenario, seed) present in both; "
          f"'higher' = {a} higher than {b}")
    print("| method | metric | pairs | higher | lower | equal | mean A | mean B | Wilcoxon p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        pairs = [(by[k], by[(k[0], k[1], b, m)]) for k in sorted(by)
                 if k[2] == a and k[3] == m and (k[0], k[1], b, m) in by]
        for name, f in (("FQ QA", lambda x: x["fq"]), ("FQ stmt", lambda x: x["fqs"]),
                        ("abs d acc QA", lambda x: abs(x["dacc"]))):
            va = np.array([f(p[0]) for p in pairs])
            vb = np.array([f(p[1]) for p in pairs])
            d = va - vb
            # Exact ties (e.g. KS p-values that coincide on small samples) carry no sign.
            hi, lo = int((d > 1e-12).sum()), int((d < -1e-12).sum())
            try:
                p = f"{wilcoxon(va, vb).pvalue:.3f}"
            except ValueError:  # all differences zero, or too few pairs
                p = "—"
            print(f"| {m} | {name} | {len(pairs)} | {hi} | {lo} | {len(pairs) - hi - lo} "
                  f"| {va.mean():.3f} | {vb.mean():.3f} | {p} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outside_check_out", help="the folder run.py wrote to")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two tags to compare, paired over runs")
    args = ap.parse_args(argv)
    rows = load(args.out)
    if not rows:
        raise SystemExit(f"no results under {args.out}/<scenario>_s<seed>/<tag>/results.json")
    table(rows)
    if args.compare:
        compare(rows, *args.compare)


if __name__ == "__main__":
    main()
