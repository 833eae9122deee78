"""``alter quality``: does the default ``unlearn`` call unlearn, on data it was never tuned on?

For each scenario of :mod:`alter.data.scenarios` and each seed: a tiny Llama memorizes every
row (forget and retain; full-parameter :func:`alter.training.finetune`), giving the target
model; then each method runs from a copy of it with ``unlearn(model, tokenizer, forget,
retain, method=...)`` and nothing else (the ablations of ALTER change one
:class:`AlterConfig` field). Metrics, before and after:

* fact accuracy on forget and retain: teacher-forced argmax accuracy over the tokens of
  the fact values only (:func:`alter.data.scenarios.fact_token_mask`), micro-averaged;
* for the ``tofu`` scenario (TOFU format, :func:`alter.data.tofu_mini`): forget quality and
  model utility (:func:`alter.evaluation.evaluate_tofu`, against a retain model).

:func:`run_suite` runs (scenario, seed) pairs in a process pool (one thread each),
memorizes once per pair and writes ``QUALITY.json``, ``QUALITY.md`` and a trade-off plot.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from alter.config import AlterConfig
from alter.data.scenarios import (DEVELOPMENT, DEVELOPMENT_SEEDS, HELD_OUT, HELD_OUT_SEEDS, Scenario, build_scenario,
                             fact_token_mask)
from alter.methods import METHODS
from alter.methods.data import eval_forwards
from alter.methods.params import LR_MAX, LR_MIN, LR_SCALE
from alter.training.finetune import finetune
from alter.training.loop import unlearn

# ALTER with one component off: the AlterConfig fields that switch it.
ABLATIONS = {
    "alter-no-entropy-routing": {"tau_high": 0.01, "k_high": 1},  # every token routed as a low-entropy one
    "alter-nll-ascent": {"forget_loss": "nll_ascent"},  # IHL replaced by NLL ascent
    "alter-no-structural": {"lam": 0.0},
    "alter-a-high-entropy-only": {"a_learns_from_high_entropy_only": True},  # the paper's A (the default: every token)
}
ALL_RUNS = METHODS + tuple(ABLATIONS)
MEMORIZE = {"batch_size": 16, "lr": 3e-3}


def fact_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """Teacher-forced argmax accuracy over the fact-value tokens of ``rows`` (micro-average),
    in eval mode without gradients (the model's mode is restored afterwards)."""
    examples = []
    for row in rows:
        ids, mask = fact_token_mask(tokenizer, row)
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "fact": [int(m) for m in mask]})
    correct = total = 0
    for _, batch, out in eval_forwards(model, examples, tokenizer.pad_token_id, batch_size):
        predicted = out.logits[:, :-1].argmax(-1)
        fact = batch["fact"][:, 1:].bool()
        correct += int((predicted == batch["input_ids"][:, 1:])[fact].sum())
        total += int(fact.sum())
    return correct / max(total, 1)


def memorize(built: dict, scenario: Scenario, seed: int):
    """The target model: ``built["model"]`` trained on forget + retain (in place)."""
    import datasets

    data = datasets.concatenate_datasets([built["forget"], built["retain"]])
    return finetune(built["model"], built["tokenizer"], data, epochs=scenario.memorize_epochs, seed=seed,
                    progress=False, **MEMORIZE)


def run_config(name: str) -> tuple[str, AlterConfig | None]:
    """(method, config) of a run name of :data:`ALL_RUNS` (config None: the default)."""
    if name in ABLATIONS:
        return "alter", dataclasses.replace(AlterConfig(), **ABLATIONS[name])
    return name, None


def evaluate_run(model, built: dict) -> dict:
    tok, rows = built["tokenizer"], built["rows"]
    return {"forget_acc": fact_accuracy(model, tok, rows["forget"]),
            "retain_acc": fact_accuracy(model, tok, rows["retain"])}


# ----------------------------------------------------------------------------- the suite

def run_pair(scenario: Scenario, seed: int, runs: tuple[str, ...], max_steps: int | None = None) -> list[dict]:
    """Memorize one (scenario, seed) and unlearn a copy of the target with each run;
    returns one result dict per run (plus the "target" row)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    built = build_scenario(scenario, seed)
    target = memorize(built, scenario, seed)
    before = evaluate_run(target, built)
    common = {"scenario": scenario.name, "seed": seed}
    results = [{**common, "run": "target", **before, "seconds": time.perf_counter() - started}]
    for name in runs:
        method, config = run_config(name)
        model = copy.deepcopy(target)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unlearn(model, built["tokenizer"], built["forget"], built["retain"], config=config, method=method,
                    seed=seed, progress=False, max_steps=max_steps)
        report = model.unlearn_report
        after = evaluate_run(model, built)
        results.append({**common, "run": name, **after, "seconds": time.perf_counter() - t0,
                        "steps": report.steps + report.router_warmup,
                        "forget_routing_share": report.forget_routing_share,
                        "retain_leak_share": report.retain_leak_share,
                        "forget_ratio": _ratio(after["forget_acc"], before["forget_acc"]),
                        "retain_ratio": _ratio(after["retain_acc"], before["retain_acc"])})
    return results


def _ratio(after: float, before: float) -> float:
    return after / before if before > 0 else float("nan")


def _pair_cost(scenario: Scenario) -> int:
    """A proxy of a pair's run time: facts to memorize and unlearn times depth."""
    return scenario.num_entities * scenario.facts_per_entity * scenario.num_layers


def _pair_job(args):
    return run_pair(*args)


def run_suite(scenarios, seeds, runs=ALL_RUNS, workers: int = 2, max_steps: int | None = None,
              log=print) -> list[dict]:
    """Every (scenario, seed) pair with every run, ``workers`` processes of one thread each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = [(scenario, seed, tuple(runs), max_steps) for scenario in scenarios for seed in seeds]
    # Largest scenarios first, so that no long pair runs alone at the end.
    jobs.sort(key=lambda job: -_pair_cost(job[0]))
    results: list[dict] = []
    # A bar over the pairs on a terminal (disable=None: off when output is not a tty).
    bar = tqdm(total=len(jobs), desc="alter quality: scenario-seed pairs", disable=None)
    if workers <= 1:
        for job in jobs:
            results += _logged(_pair_job(job), log)
            bar.update(1)
        bar.close()
        return results
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_pair_job, job) for job in jobs]
        for future in as_completed(futures):
            results += _logged(future.result(), log)
            bar.update(1)
    bar.close()
    return results


def _logged(rows: list[dict], log) -> list[dict]:
    for row in rows:
        log(f"[alter quality] {row['scenario']} seed {row['seed']} {row['run']}: forget {row['forget_acc']:.2f} "
            f"retain {row['retain_acc']:.2f} ({row['seconds']:.0f} s)")
    return rows


def summarize(results: list[dict]) -> list[dict]:
    """Mean and std over seeds per (scenario, run) of the accuracies and ratios."""
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["scenario"], row["run"]), []).append(row)
    summary = []
    for (scenario, run), rows in groups.items():
        entry = {"scenario": scenario, "run": run, "seeds": len(rows)}
        for key in ("forget_acc", "retain_acc", "forget_ratio", "retain_ratio", "forget_routing_share",
                    "retain_leak_share", "steps", "seconds"):
            values = [r[key] for r in rows if r.get(key) is not None and not _isnan(r[key])]
            if values:
                entry[key] = float(np.mean(values))
                entry[key + "_std"] = float(np.std(values))
        summary.append(entry)
    order = {name: i for i, name in enumerate(("target",) + ALL_RUNS)}
    return sorted(summary, key=lambda e: (e["scenario"], order.get(e["run"], 99)))


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def meets_targets(summary: list[dict], forget_max: float = 0.5, retain_min: float = 0.9) -> dict[str, bool]:
    """Per scenario: the default call (run "alter") forgets to <= ``forget_max`` x its accuracy
    before and keeps >= ``retain_min`` x the retained accuracy (seed means)."""
    return {e["scenario"]: e.get("forget_ratio", math.nan) <= forget_max and e.get("retain_ratio", math.nan) >= retain_min
            for e in summary if e["run"] == "alter"}


def dominating_runs(summary: list[dict], name: str = "alter") -> dict[str, list[str]]:
    """Per scenario, the other runs whose seed means forget at least as much and keep at
    least as much as ``name`` (at least as good on both ratios, better on one)."""
    out: dict[str, list[str]] = {}
    for entry in summary:
        if entry["run"] != name or "forget_ratio" not in entry:
            continue
        f, r = entry["forget_ratio"], entry["retain_ratio"]
        out[entry["scenario"]] = [
            e["run"] for e in summary
            if e["scenario"] == entry["scenario"] and e["run"] not in (name, "target") and "forget_ratio" in e
            and e["forget_ratio"] <= f and e["retain_ratio"] >= r and (e["forget_ratio"] < f or e["retain_ratio"] > r)]
    return out


def plot_tradeoff(summary: list[dict], path: str) -> None:
    """Retain ratio against forget ratio, one panel per scenario, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({e["scenario"] for e in summary})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, scenario in zip(axes[0], scenarios):
        for i, name in enumerate(ALL_RUNS):
            entry = next((e for e in summary if e["scenario"] == scenario and e["run"] == name), None)
            if entry is None or "forget_ratio" not in entry:
                continue
            marker = "*" if name == "alter" else ("^" if name.startswith("alter-") else "o")
            ax.errorbar(entry["forget_ratio"], entry["retain_ratio"], xerr=entry["forget_ratio_std"],
                        yerr=entry["retain_ratio_std"], fmt=marker, color=colors(i % 10),
                        markersize=14 if name == "alter" else 7, label=name, alpha=0.85)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_title(scenario, fontsize=10)
        ax.set_xlabel("forget acc after / before (lower is better)")
        ax.set_xlim(-0.05, 1.1)
        ax.set_ylim(0.0, 1.1)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("retain acc after / before (higher is better)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_markdown(summary: list[dict], scenarios, seeds, seconds: float, quick: bool) -> str:
    """The seed-averaged table as Markdown (QUALITY.md)."""
    held = {s.name for s in HELD_OUT}
    lines = ["# Unlearning quality: the default call on held-out scenarios", "",
             "Produced by `alter quality` (`make quality`) in "
             f"{seconds / 60:.1f} min{' (--quick: smoke sizes, not a result)' if quick else ''}. "
             f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds.",
             "",
             "Each scenario: a tiny Llama memorizes every row (forget + retain); each method then runs from a copy "
             "with `alter.unlearn(model, tokenizer, forget, retain, method=...)` and nothing else (ablations change "
             "one `AlterConfig` field; the full-parameter learning rate is unlearn's default, sized from the model: "
             "`alter.methods.params.full_lr`); "
             "every run stops early by unlearn's default rule (`early_stop_share`, docs/training.md, "
             "\"Run length and early stop\"); steps: the optimizer steps run, router warm-up included. "
             "Accuracy: teacher-forced argmax over the tokens of the fact values only. Ratios: after / before "
             "(forget: lower is better, target ≤ 0.5; retain: higher is better, target ≥ 0.9). Routing shares "
             "(from `model.unlearn_report`): routing weight the trained routers give the forget experts on the "
             "forget positions that teach them, and on retained tokens (leak).", "",
             "## Scenarios", "",
             "| scenario | split | domain | format | entities × facts | forget rows | tokenizer | layers × width |",
             "|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        split = "held out" if s.name in held else "development"
        lines.append(f"| {s.name} | {split} | {s.domain} | {s.format} | {s.num_entities} × {s.facts_per_entity} | "
                     f"{s.forget_rows} | {s.tokenizer} | {s.num_layers} × {s.hidden_size} |")
    lines += ["", "Development scenarios (the only ones the defaults were tuned on, seeds "
              f"{', '.join(map(str, DEVELOPMENT_SEEDS))}; see `alter.data.scenarios.DEVELOPMENT`): "
              f"{', '.join(s.name for s in DEVELOPMENT)}.", ""]
    targets = meets_targets(summary)
    lines += ["## Results", "",
              "| scenario | run | seeds | forget acc | retain acc | forget ratio | retain ratio | forget→forget experts | "
              "retain leak | steps | s/run |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(entry, key, digits=2):
        if key not in entry:
            return "–"
        return f"{entry[key]:.{digits}f} ± {entry[key + '_std']:.{digits}f}"

    for e in summary:
        lines.append(f"| {e['scenario']} | {'**alter (default)**' if e['run'] == 'alter' else e['run']} | {e['seeds']} | "
                     f"{cell(e, 'forget_acc')} | {cell(e, 'retain_acc')} | {cell(e, 'forget_ratio')} | "
                     f"{cell(e, 'retain_ratio')} | {cell(e, 'forget_routing_share')} | {cell(e, 'retain_leak_share')} | "
                     f"{format(e['steps'], '.0f') if 'steps' in e else '–'} | {e.get('seconds', 0):.0f} |")
    lines += ["", "## Targets (default call, seed means)", "",
              "Forget ratio ≤ 0.5 and retain ratio ≥ 0.9; runs that dominate the default ALTER call "
              "(forget ratio ≤ and retain ratio ≥ ALTER's, one of them strictly):", ""]
    dominated = dominating_runs(summary)
    for scenario, ok in targets.items():
        better = dominated.get(scenario) or []
        lines.append(f"- {scenario}: target {'met' if ok else '**not met**'}; dominated by "
                     f"{', '.join(better) if better else 'no other run'}")
    lines += ["", "![trade-off](quality_tradeoff.png)", ""]
    return "\n".join(lines)


def main(out: str, quick: bool = False, seeds=None, workers: int = 2, development: bool = False,
         scenarios=None) -> list[dict]:
    """``alter quality``: run the suite and write QUALITY.json, QUALITY.md and the plot into ``out``.

    ``quick``: one development scenario, one seed, 3 steps per run (a smoke test; it
    says nothing about quality). ``development``: the development scenarios and seeds.
    """
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if scenarios is None:
        scenarios = DEVELOPMENT if development else HELD_OUT
    if seeds is None:
        seeds = DEVELOPMENT_SEEDS if development else HELD_OUT_SEEDS
    max_steps = None
    if quick:  # a development scenario: the smoke run never touches the held-out ones
        scenarios = [dataclasses.replace(DEVELOPMENT[1], memorize_epochs=2)]
        seeds, max_steps = DEVELOPMENT_SEEDS[:1], 3
    results = run_suite(scenarios, seeds, workers=workers, max_steps=max_steps)
    summary = summarize(results)
    seconds = time.perf_counter() - started
    with open(os.path.join(out, "QUALITY.json"), "w") as f:
        json.dump({"scenarios": [s.to_dict() for s in scenarios], "seeds": list(seeds), "quick": quick,
                   "default_config": AlterConfig().to_dict(), "ablations": ABLATIONS,
                   "full_lr": {"scale": LR_SCALE, "min": LR_MIN, "max": LR_MAX},
                   "seconds": seconds, "summary": summary, "results": results}, f, indent=1)
    write_report(out)
    print(f"[alter quality] wrote {out}/QUALITY.md, QUALITY.json, quality_tradeoff.png in {seconds / 60:.1f} min")
    return summary


def write_report(out: str) -> None:
    """``out/QUALITY.md`` and ``out/quality_tradeoff.png`` from ``out/QUALITY.json``."""
    with open(os.path.join(out, "QUALITY.json")) as f:
        record = json.load(f)
    scenarios = [Scenario(**s) for s in record["scenarios"]]
    plot_tradeoff(record["summary"], os.path.join(out, "quality_tradeoff.png"))
    with open(os.path.join(out, "QUALITY.md"), "w") as f:
        f.write(format_markdown(record["summary"], scenarios, record["seeds"], record["seconds"], record["quick"]))
