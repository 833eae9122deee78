"""The report of ``alter quality`` (:mod:`alter.quality`): seed means of the result rows,
the issue's targets, ``QUALITY.md`` and the trade-off plot, from ``QUALITY.json``."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from alter.data.scenarios import DEVELOPMENT, DEVELOPMENT_SEEDS, HELD_OUT, Scenario
from alter.quality import ALL_RUNS, RELEARN, ZOO_RUNS

ORDER = ("target", "oracle") + ALL_RUNS + ZOO_RUNS
# The targets for the default call (seed means): forget quality on the unlearned
# phrasing and on the others, forget accuracy near the oracle's, retained accuracy kept,
# and relearning no stronger than on the oracle.
TARGETS = {"forget_quality": 0.05, "other_phrasings_quality": 0.01, "oracle_acc_gap": 0.05, "retain_ratio": 0.95,
           "relearn_gap": 0.1}


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def summarize(results: list[dict]) -> list[dict]:
    """Mean and std (``key + "_std"``) over seeds per (scenario, run) of every numeric
    field; per-layer lists (``*_by_layer``) are averaged layer by layer."""
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["scenario"], row["run"]), []).append(row)
    summary = []
    for (scenario, run), rows in groups.items():
        entry = {"scenario": scenario, "run": run, "seeds": len(rows)}
        keys = dict.fromkeys(k for r in rows for k in r if k not in ("scenario", "run", "seed"))
        for key in keys:
            values = [r[key] for r in rows if r.get(key) is not None and not _isnan(r[key])]
            if not values:
                continue
            if key in ("routing_layers", "refused"):  # the patched modules' names; why a method refused the rows
                entry[key] = values[0]
                continue
            if key.endswith("_by_layer"):
                entry[key] = np.mean(values, axis=0).tolist()
                continue
            entry[key] = float(np.mean(values))
            entry[key + "_std"] = float(np.std(values))
        summary.append(entry)
    order = {name: i for i, name in enumerate(ORDER)}
    return sorted(summary, key=lambda e: (e["scenario"], order.get(e["run"], 99)))


def _entry(summary, scenario, run):
    return next((e for e in summary if e["scenario"] == scenario and e["run"] == run), None)


def meets_targets(summary: list[dict], name: str = "alter") -> dict[str, dict[str, bool]]:
    """Per scenario, each of the :data:`TARGETS` that run ``name`` meets (seed means):
    forget quality on the unlearned phrasing and on every other one, forget accuracy
    within the gap of the oracle's, retain ratio, relearned accuracy at most the oracle's
    plus the gap (a target the data cannot measure is left out)."""
    out = {}
    for entry in summary:
        oracle = _entry(summary, entry["scenario"], "oracle")
        if entry["run"] != name or oracle is None:
            continue
        others = [v for k, v in entry.items() if k.startswith("forget_quality_") and not k.endswith("_std")]
        met = {"forget_quality": entry.get("forget_quality", 0.0) >= TARGETS["forget_quality"],
               "forget acc vs oracle": abs(entry["forget_acc"] - oracle["forget_acc"]) <= TARGETS["oracle_acc_gap"],
               "retain_ratio": entry.get("retain_ratio", 0.0) >= TARGETS["retain_ratio"]}
        if others:
            met["other phrasings"] = min(others) >= TARGETS["other_phrasings_quality"]
        if "relearn_acc" in entry and "relearn_acc" in oracle:
            met["relearning"] = entry["relearn_acc"] <= oracle["relearn_acc"] + TARGETS["relearn_gap"]
        out[entry["scenario"]] = met
    return out


def dominating_runs(summary: list[dict], name: str = "alter") -> dict[str, list[str]]:
    """Per scenario, the other runs whose seed means are at least as good as ``name``'s on
    forget quality (higher) and retain ratio (higher), and better on one."""
    out: dict[str, list[str]] = {}
    for entry in summary:
        if entry["run"] != name or "forget_quality" not in entry:
            continue
        q, r = entry["forget_quality"], entry["retain_ratio"]
        out[entry["scenario"]] = [
            e["run"] for e in summary
            if e["scenario"] == entry["scenario"] and e["run"] not in (name, "target", "oracle")
            and "forget_quality" in e and e["forget_quality"] >= q and e["retain_ratio"] >= r
            and (e["forget_quality"] > q or e["retain_ratio"] > r)]
    return out


def paired_comparison(results: list[dict], name: str = "alter") -> list[dict]:
    """``name`` against every other method run, paired over the (scenario, seed) pairs
    both ran: how often ``name`` has the higher forget quality, the retain ratio at least
    as high, and both; with the one-sided sign test's p-value (``scipy.stats.binomtest``)
    of "higher forget quality" (ties count against ``name``)."""
    from scipy.stats import binomtest

    runs = {(r["scenario"], r["seed"], r["run"]): r for r in results if "refused" not in r}
    out = []
    for other in dict.fromkeys(r["run"] for r in results):
        if other in (name, "target", "oracle"):
            continue
        pairs = [(a, runs[key[:2] + (other,)]) for key, a in runs.items()
                 if key[2] == name and key[:2] + (other,) in runs]
        if not pairs:
            continue
        higher = sum(a["forget_quality"] > b["forget_quality"] for a, b in pairs)
        kept = sum(a["retain_ratio"] >= b["retain_ratio"] for a, b in pairs)
        both = sum(a["forget_quality"] > b["forget_quality"] and a["retain_ratio"] >= b["retain_ratio"]
                   for a, b in pairs)
        out.append({"run": other, "pairs": len(pairs), "higher_quality": higher, "retain_kept": kept,
                    "both": both, "sign_test_p": binomtest(higher, len(pairs), 0.5, alternative="greater").pvalue})
    return out


def plot_tradeoff(summary: list[dict], path: str) -> None:
    """Retain ratio against forget quality (log scale), one panel per scenario, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({e["scenario"] for e in summary})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.2), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, scenario in zip(axes[0], scenarios):
        for i, name in enumerate(ALL_RUNS):
            entry = _entry(summary, scenario, name)
            if entry is None or "forget_quality" not in entry:
                continue
            marker = "*" if name == "alter" else ("^" if name.startswith("alter-") else "o")
            # p-values below 1e-6 sit on the left edge: a fixed range keeps panels comparable.
            ax.errorbar(max(entry["forget_quality"], 1e-6), entry["retain_ratio"], yerr=entry["retain_ratio_std"],
                        fmt=marker, color=colors(i % 20), markersize=14 if name == "alter" else 7, label=name,
                        alpha=0.85)
        ax.axvline(TARGETS["forget_quality"], color="grey", lw=0.8, ls="--")
        ax.axhline(TARGETS["retain_ratio"], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(5e-7, 2.0)
        ax.set_title(scenario, fontsize=10)
        ax.set_xlabel("forget quality vs oracle (KS p, higher is better)")
        ax.set_ylim(0.0, 1.1)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("retain acc after / before (higher is better)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(entry, key, digits=2) -> str:
    if key not in entry:
        return "–"
    value, std = entry[key], entry[key + "_std"]
    if key.startswith(("forget_quality", "relearn_quality")) and 0 < value < 0.01:
        return f"{value:.1e} ± {std:.0e}"  # p-values: small ones in scientific notation
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def _layers(entry, key) -> str:
    """``layer.module share`` per patched module (``model.layers.0.self_attn.q_proj`` -> ``0.q_proj``)."""
    if not entry.get(key):
        return "–"
    names = [name.split("layers.")[-1].replace("self_attn.", "").replace("mlp.", "") for name in entry["routing_layers"]]
    return ", ".join(f"{name} {v:.2f}" for name, v in zip(names, entry[key]))


TITLE = "Unlearning quality: the default call on held-out scenarios, against an oracle"
PRODUCED_BY = "`alter quality` (`make quality`)"


def format_markdown(summary: list[dict], scenarios, seeds, seconds: float, quick: bool,
                    results: list[dict] = (), title: str = TITLE, produced_by: str = PRODUCED_BY) -> str:
    """The seed-averaged tables as Markdown (QUALITY.md); ``results`` (the per-seed rows)
    give the paired comparison of ALTER with every other run. ``title`` and
    ``produced_by`` name a table that another script produced."""
    held = {s.name for s in HELD_OUT}
    lines = [f"# {title}", "",
             f"Produced by {produced_by} in "
             f"{seconds / 60:.1f} min{' (--quick: smoke sizes, not a result)' if quick else ''}. "
             f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds.",
             "",
             "Each scenario: a tiny Llama memorizes every row of every phrasing (forget + retain): the **target**; the "
             "same initialization trained the same way without the forget rows is the **oracle** (what perfect "
             "unlearning leaves). Each method runs from a copy of the target with `alter.unlearn(model, tokenizer, "
             "forget, retain, method=...)` and nothing else, on the scenario's own phrasing (the first one listed; "
             "the full-parameter learning rate is unlearn's default, sized from the model: "
             "`alter.methods.params.full_lr`); every run "
             "stops by unlearn's default rule (docs/training.md, \"Run length and early stop\"); steps: optimizer "
             "steps, router warm-up included.", "",
             "Columns (`alter.evaluation.facts`): **acc**: teacher-forced argmax accuracy over the tokens of the fact "
             "values only; **forget quality**: KS-test p-value between the model's and the oracle's per-fact value "
             "log-probabilities on the forgotten facts (high: like the oracle; < 0.05: still knows them, or forgot "
             "more than the oracle); **other phrasings**: forget acc · forget quality of the same facts in the "
             "phrasings unlearn never saw; **MIA AUC**: loss-based membership inference of the forgotten facts "
             "against never-seen ones (0.5: look unseen); **gen hits**: share of forgotten facts whose greedy "
             "continuation names the value (as whole words, once the row's entity is taken out); **plausible**: "
             "share whose greedy continuation names a value of the fact's kind, its own or another entity's (a "
             "model that never saw an entity answers with a plausible wrong value; a low share: the answers "
             "babble); **relearn**: every weight fine-tuned "
             f"{RELEARN['epochs']} epochs (batch {RELEARN['batch_size']}, lr {RELEARN['lr']:g}) on half of the "
             "forgotten entities: acc and forget quality (vs the oracle under the same fine-tune) on the other half; "
             "**held back**: that half's acc before the fine-tune (what the run left; relearn acc minus it is "
             "what the fine-tune brings back, benchmarks/relearn_paths.py); "
             "**routing**: share of the routing weight on the forget experts at the forget positions after the "
             "row leaves every retained row, and on retained tokens (leak), mean over layers (per layer below): "
             "the sequence route's (ALTER's default, docs/routing.md (e)), or the trained routers' under "
             "`routing=\"token\"`.", "",
             "## Scenarios", "",
             "| scenario | split | domain | phrasings (unlearned first) | entities × facts | forget rows | tokenizer | "
             "layers × width |", "|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        split = "held out" if s.name in held else "development"
        lines.append(f"| {s.name} | {split} | {s.domain} | {', '.join(s.all_phrasings)} | {s.num_entities} × "
                     f"{s.facts_per_entity} | {s.forget_rows} | {s.tokenizer} | {s.num_layers} × {s.hidden_size} |")
    lines += ["", "Development scenarios (the only ones the defaults were tuned on, seeds "
              f"{', '.join(map(str, DEVELOPMENT_SEEDS))}; see `alter.data.scenarios.DEVELOPMENT`): "
              f"{', '.join(s.name for s in DEVELOPMENT)}.", ""]
    lines += ["## Results", "",
              "| scenario | run | seeds | forget acc | retain acc | retain ratio | forget quality | other phrasings "
              "(acc · quality) | MIA AUC | gen hits | plausible | held back acc | relearn acc | relearn quality | "
              "forget→forget experts | retain leak | steps | s/run |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        if "refused" in e:  # no numbers: the method refused the scenario's rows
            lines.append(f"| {e['scenario']} | {e['run']} | {e['seeds']} | refused: {e['refused']} |" + " |" * 14)
            continue
        others = "; ".join(f"{key[len('forget_acc_'):]} {_cell(e, key)} · "
                           f"{_cell(e, 'forget_quality_' + key[len('forget_acc_'):])}"
                           for key in e if key.startswith("forget_acc_") and not key.endswith("_std")) or "–"
        lines.append(f"| {e['scenario']} | {'**alter (default)**' if e['run'] == 'alter' else e['run']} | {e['seeds']} | "
                     f"{_cell(e, 'forget_acc')} | {_cell(e, 'retain_acc')} | {_cell(e, 'retain_ratio')} | "
                     f"{_cell(e, 'forget_quality')} | {others} | {_cell(e, 'mia_auc')} | {_cell(e, 'generation_hits')} | "
                     f"{_cell(e, 'plausible_answers')} | "
                     f"{_cell(e, 'held_back_acc')} | {_cell(e, 'relearn_acc')} | {_cell(e, 'relearn_quality')} | {_cell(e, 'forget_routing_share')} | "
                     f"{_cell(e, 'retain_leak_share')} | {format(e['steps'], '.0f') if 'steps' in e else '–'} | "
                     f"{e.get('seconds', 0):.0f} |")
    lines += ["", "## Routing per layer", "",
              "Seed means per patched layer, first layer first: share of the routing weight on the forget experts.", "",
              "| scenario | run | forget tokens → forget experts | retained tokens → forget experts (leak) |",
              "|---|---|---|---|"]
    lines += [f"| {e['scenario']} | {e['run']} | {_layers(e, 'forget_routing_by_layer')} | "
              f"{_layers(e, 'retain_leak_by_layer')} |" for e in summary if e.get("forget_routing_by_layer")]
    lines += ["", "## Targets (default call, seed means)", "",
              f"Forget quality ≥ {TARGETS['forget_quality']} on the unlearned phrasing and ≥ "
              f"{TARGETS['other_phrasings_quality']} on the others; forget acc within ±{TARGETS['oracle_acc_gap']} of "
              f"the oracle's; retain ratio ≥ {TARGETS['retain_ratio']}; relearned acc ≤ the oracle's + "
              f"{TARGETS['relearn_gap']}. Runs that dominate the default ALTER call (forget quality ≥ and retain ratio "
              "≥ ALTER's, one of them strictly) are named.", ""]
    dominated = dominating_runs(summary)
    for scenario, met in meets_targets(summary).items():
        missed = [k for k, ok in met.items() if not ok]
        better = dominated.get(scenario) or []
        lines.append(f"- {scenario}: {'all targets met' if not missed else '**missed: ' + ', '.join(missed) + '**'}; "
                     f"dominated by {', '.join(better) if better else 'no other run'}")
    paired = paired_comparison(list(results))
    if paired:
        lines += ["", "## ALTER against each run, paired over scenarios × seeds", "",
                  "Per (scenario, seed): does the default ALTER call have the higher forget quality, a retain ratio "
                  "at least as high, both; p: one-sided sign test of the higher forget quality.", "",
                  "| run | pairs | ALTER's forget quality higher | ALTER's retain ratio ≥ | both | sign test p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['run']} | {p['pairs']} | {p['higher_quality']} | {p['retain_kept']} | {p['both']} | "
                  f"{p['sign_test_p']:.2g} |" for p in paired]
    lines += ["", "![trade-off](quality_tradeoff.png)", ""]
    return "\n".join(lines)


def write_report(out: str, **titles) -> None:
    """``out/QUALITY.md`` and ``out/quality_tradeoff.png`` from ``out/QUALITY.json``;
    ``titles``: :func:`format_markdown`'s ``title`` and ``produced_by``."""
    with open(os.path.join(out, "QUALITY.json")) as f:
        record = json.load(f)
    scenarios = [Scenario(**s) for s in record["scenarios"]]
    plot_tradeoff(record["summary"], os.path.join(out, "quality_tradeoff.png"))
    with open(os.path.join(out, "QUALITY.md"), "w") as f:
        f.write(format_markdown(record["summary"], scenarios, record["seeds"], record["seconds"], record["quick"],
                                record["results"], **titles))
