"""``alter quality``: does the default ``unlearn`` call unlearn, on data it was never tuned on?

For each scenario of :mod:`alter.data.scenarios` and each seed: a tiny Llama memorizes every
row of every phrasing (forget and retain; full-parameter :func:`alter.training.finetune`),
giving the target model; the same initialization trained the same way without the forget
rows gives the oracle (what perfect unlearning would leave). Each method then runs from a
copy of the target with ``unlearn(model, tokenizer, forget, retain, method=...)`` and
nothing else, given the scenario's own phrasing only (ALTER's ablations, behind
``ablations=True``, change one :class:`AlterConfig` field). Metrics of the target, the
oracle and every run (:mod:`alter.evaluation.facts`):

* fact accuracy on forget and retain: teacher-forced argmax accuracy over the tokens of
  the fact values only, micro-averaged; on the forget facts in every phrasing;
* forget quality: the KS-test p-value between the model's and the oracle's per-fact value
  log-probabilities on the forgotten facts, in every phrasing;
* a loss-based membership-inference AUC of the forgotten facts against facts no model saw;
* generation hits: the share of forgotten facts whose greedy continuation names the value;
  plausible answers: the share whose continuation holds a value of the fact's kind (any
  entity's: a model that never saw the entity answers with a plausible wrong one);
* relearning: the model fine-tuned a few steps on half of the forgotten entities
  (:data:`RELEARN`); accuracy on the other half, and its forget quality against the oracle
  under the same fine-tune;
* routing shares per patched layer (``model.unlearn_report``).

:func:`run_suite` runs (scenario, seed) pairs in a process pool (one thread each) and
:func:`main` writes ``QUALITY.json``, ``QUALITY.md`` and a trade-off plot
(:mod:`alter.quality_report`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings

import torch
from tqdm.auto import tqdm

from alter.config import AlterConfig
from alter.data.scenarios import (DEVELOPMENT, DEVELOPMENT_SEEDS, HELD_OUT, HELD_OUT_SEEDS, Scenario, build_scenario,
                                  to_dataset)
from alter.evaluation.facts import (fact_accuracy, fact_forget_quality, fact_mia_auc, fact_scores,  # noqa: F401
                                    generation_rates, values_by_kind)
from alter.methods import METHODS, method_class, parse_run
from alter.methods.params import LR_MAX, LR_MIN, LR_SCALE, PARAMS
from alter.training.finetune import finetune
from alter.training.loop import unlearn

# ALTER with one component off or replaced: the AlterConfig fields that switch it.
ABLATIONS = {
    "alter-all-tokens": {"forget_tokens": "all"},  # every forget token pushed down (docs/training.md, "Forget tokens")
    "alter-token-routing": {"routing": "token"},  # the per-token routers instead of the sequence route
    # the per-token routers, every token routed as a low-entropy one
    "alter-no-entropy-routing": {"routing": "token", "tau_high": 0.01, "k_high": 1},
    # the default until 2026-12-07: the per-token routers, every forget token pushed down
    "alter-token-routing-all-tokens": {"routing": "token", "forget_tokens": "all"},
    "alter-nll-ascent": {"forget_loss": "nll_ascent"},  # IHL replaced by NLL ascent
    "alter-no-structural": {"lam": 0.0},
    "alter-a-high-entropy-only": {"a_learns_from_high_entropy_only": True},  # the paper's A (the default: every token)
    # the IHL with no floor, the stop counting the tokens still predicted (the default until 2026-12-07)
    "alter-no-forget-floor": {"forget_floor": False},
    # template words kept whatever the trigram says (docs/training.md, "Template words")
    "alter-template-tokens": {"template_tokens": True},
}
ALL_RUNS = METHODS + tuple(ABLATIONS)
# Every method on each parameterization besides its default, named "method@params"
# (``--zoo``; every method runs on its default in any case): the pairs a method refuses
# (alter off asym_lora, lora off lora) are left out.
ZOO_RUNS = tuple(f"{m}@{p}" for m in METHODS for p in PARAMS
                 if p != method_class(m).default_params and p in method_class(m).supported_params)
MEMORIZE = {"batch_size": 16, "lr": 3e-3}
# The relearning attack: every weight fine-tuned on the rows (unlearned phrasing) of half
# of the forgotten entities, 3 epochs of 8 rows a step.
RELEARN = {"epochs": 3, "batch_size": 8, "lr": 1e-3}


def memorize(model, tokenizer, data, scenario: Scenario, seed: int):
    """``model`` trained on ``data`` in place (the target on ``built["memorize"]``, the
    oracle on ``built["oracle"]``: the same settings, the same seed)."""
    return finetune(model, tokenizer, data, epochs=scenario.memorize_epochs, seed=seed, progress=False, **MEMORIZE)


def run_config(name: str) -> tuple[str, AlterConfig | None, str | None]:
    """(method, config, params) of a run name of :data:`ALL_RUNS` or :data:`ZOO_RUNS`
    (config None: the default; params None: the method's default)."""
    if name in ABLATIONS:
        return "alter", dataclasses.replace(AlterConfig(), **ABLATIONS[name]), None
    method, params = parse_run(name)
    return method, None, params


def relearn_split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The forget rows of the first half of the forgotten entities (in order of
    appearance; the relearning data) and those of the other half (held back)."""
    entities = list(dict.fromkeys(row["entity"] for row in rows))
    first = set(entities[:len(entities) // 2])
    return [r for r in rows if r["entity"] in first], [r for r in rows if r["entity"] not in first]


def _adapter_weight(name: str) -> bool:
    return ".lora_" in name or ".router." in name


# What the relearning attack trains: every weight (the report's attack), or, to find the
# path the facts come back by (benchmarks/relearn_paths.py), the adapters (A, B, routers)
# or the base only.
ATTACKED_WEIGHTS = {"all": lambda name: True, "adapters": _adapter_weight,
                    "base": lambda name: not _adapter_weight(name)}


def relearned_scores(model, built: dict, seed: int, weights: str = "all") -> dict | None:
    """:func:`fact_scores` of the held-back half after the relearning attack on a copy of
    ``model``, training the weights :data:`ATTACKED_WEIGHTS` names ``weights`` (None when
    fewer than two entities are forgotten)."""
    relearn_rows, held_rows = relearn_split(built["rows"]["forget"])
    if not relearn_rows:
        return None
    attacked = copy.deepcopy(model)
    trains = ATTACKED_WEIGHTS[weights]
    for name, param in attacked.named_parameters():
        param.requires_grad_(trains(name))
    finetune(attacked, built["tokenizer"], to_dataset(relearn_rows), seed=seed, progress=False, **RELEARN)
    return fact_scores(attacked, built["tokenizer"], held_rows)


def score_model(model, built: dict, seed: int) -> dict:
    """Every :func:`fact_scores` a row of the report needs: the forget facts in each
    phrasing (keyed by phrasing), the retained and never-seen facts (unlearned phrasing)
    and the held-back half of the forgotten entities before (``"held_back"``) and after
    (``"relearned"``) the relearning attack (None when fewer than two are forgotten)."""
    tok, rows = built["tokenizer"], built["rows"]
    scores = {phrasing: fact_scores(model, tok, split["forget"]) for phrasing, split in built["phrasings"].items()}
    scores["retain"] = fact_scores(model, tok, rows["retain"])
    scores["never_seen"] = fact_scores(model, tok, rows["never_seen"])
    relearn_rows, held_rows = relearn_split(rows["forget"])
    scores["held_back"] = fact_scores(model, tok, held_rows) if relearn_rows else None
    scores["relearned"] = relearned_scores(model, built, seed)
    return scores


def scores_accuracy(scores: dict) -> float:
    """Fact accuracy (micro over value tokens) of :func:`fact_scores` results."""
    return float(scores["correct"].sum() / scores["tokens"].sum())


def evaluate_run(model, built: dict, scores: dict, oracle: dict | None) -> dict:
    """A result row's metrics from :func:`score_model` results of the model (``scores``)
    and of the oracle (None: the model is the oracle; no forget quality then)."""
    own, others = built["format"], [p for p in built["phrasings"] if p != built["format"]]
    rows = built["rows"]
    generation = generation_rates(model, built["tokenizer"], rows["forget"],
                                  values_by_kind(rows["forget"] + rows["retain"] + rows["never_seen"]))
    row = {"forget_acc": scores_accuracy(scores[own]), "retain_acc": scores_accuracy(scores["retain"]),
           "mia_auc": fact_mia_auc(scores[own], scores["never_seen"]),
           "generation_hits": generation["hits"], "plausible_answers": generation["plausible"]}
    for phrasing in others:
        row[f"forget_acc_{phrasing}"] = scores_accuracy(scores[phrasing])
    if scores["relearned"] is not None:
        row["held_back_acc"] = scores_accuracy(scores["held_back"])
        row["relearn_acc"] = scores_accuracy(scores["relearned"])
    if oracle is not None:
        for phrasing in [own] + others:
            key = "forget_quality" if phrasing == own else f"forget_quality_{phrasing}"
            row[key] = fact_forget_quality(scores[phrasing]["logprob"], oracle[phrasing]["logprob"])
        if scores["relearned"] is not None:
            row["relearn_quality"] = fact_forget_quality(scores["relearned"]["logprob"],
                                                         oracle["relearned"]["logprob"])
    return row


# ----------------------------------------------------------------------------- the suite

def run_pair(scenario: Scenario, seed: int, runs: tuple[str, ...], max_steps: int | None = None) -> list[dict]:
    """Memorize one (scenario, seed) into the target and the oracle and unlearn a copy of
    the target with each run; returns one result dict per run, after a "target" and an
    "oracle" row."""
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    built = dict(build_scenario(scenario, seed), format=scenario.format)
    tok = built["tokenizer"]
    init = copy.deepcopy(built["model"])
    target = memorize(built["model"], tok, built["memorize"], scenario, seed)
    target_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    oracle = memorize(init, tok, built["oracle"], scenario, seed)
    oracle_seconds = time.perf_counter() - t0
    oracle_scores, target_scores = score_model(oracle, built, seed), score_model(target, built, seed)
    before = evaluate_run(target, built, target_scores, oracle_scores)
    common = {"scenario": scenario.name, "seed": seed}
    results = [{**common, "run": "target", **before, "seconds": target_seconds},
               {**common, "run": "oracle", **evaluate_run(oracle, built, oracle_scores, None),
                "seconds": oracle_seconds}]
    for name in runs:
        method, config, params = run_config(name)
        model = copy.deepcopy(target)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                unlearn(model, tok, built["forget"], built["retain"], config=config, method=method, params=params,
                        seed=seed, progress=False, max_steps=max_steps)
            except ValueError as exc:  # a method refusing the scenario's rows (dpo: no alternate answers)
                results.append({**common, "run": name, "refused": str(exc)})
                continue
        seconds = time.perf_counter() - t0
        report = model.unlearn_report
        after = evaluate_run(model, built, score_model(model, built, seed), oracle_scores)
        by_layer = {key: None if layers is None else list(layers.values()) for key, layers in
                    (("forget_routing_by_layer", report.forget_routing_by_layer),
                     ("retain_leak_by_layer", report.retain_leak_by_layer))}
        if report.forget_routing_by_layer is not None:
            by_layer["routing_layers"] = list(report.forget_routing_by_layer)
        results.append({**common, "run": name, **after, "seconds": seconds, "steps": report.steps + report.router_warmup,
                        "forget_routing_share": report.forget_routing_share,
                        "retain_leak_share": report.retain_leak_share, **by_layer,
                        "forget_ratio": _ratio(after["forget_acc"], before["forget_acc"]),
                        "retain_ratio": _ratio(after["retain_acc"], before["retain_acc"])})
    # CPU seconds too: the pair's cost on a machine that other work shares.
    results[0]["pair_seconds"] = time.perf_counter() - started
    results[0]["pair_cpu_seconds"] = time.process_time() - cpu_started
    return results


def _ratio(after: float, before: float) -> float:
    return after / before if before > 0 else float("nan")


def _pair_cost(scenario: Scenario) -> int:
    """A proxy of a pair's run time: facts to memorize (every phrasing) and unlearn times depth."""
    return scenario.num_entities * scenario.facts_per_entity * scenario.num_layers * len(scenario.all_phrasings)


def _pair_job(args):
    return run_pair(*args)


def run_suite(scenarios, seeds, runs=METHODS, workers: int = 2, max_steps: int | None = None,
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
        if "refused" in row:
            log(f"[alter quality] {row['scenario']} seed {row['seed']} {row['run']}: refused: {row['refused']}")
            continue
        quality = f" quality {row['forget_quality']:.2g}" if "forget_quality" in row else ""
        log(f"[alter quality] {row['scenario']} seed {row['seed']} {row['run']}: forget {row['forget_acc']:.2f}"
            f"{quality} retain {row['retain_acc']:.2f} ({row['seconds']:.0f} s)")
    log(f"[alter quality] {rows[0]['scenario']} seed {rows[0]['seed']}: pair done in {rows[0]['pair_seconds']:.0f} s "
        f"({rows[0]['pair_cpu_seconds']:.0f} CPU s)")
    return rows


def main(out: str, quick: bool = False, seeds=None, workers: int = 2, development: bool = False,
         scenarios=None, ablations: bool = False, zoo: bool = False, runs=None) -> list[dict]:
    """``alter quality``: run the suite and write QUALITY.json, QUALITY.md and the plot into ``out``.

    ``quick``: one development scenario (three phrasings), one seed, 3 steps per run (a
    smoke test; it says nothing about quality). ``development``: the development scenarios
    and seeds. ``ablations``: ALTER's ablations (:data:`ABLATIONS`) run too; ``zoo``: every
    method on its other parameterizations (:data:`ZOO_RUNS`) too; ``runs``: these runs instead
    (names of :data:`ALL_RUNS` or :data:`ZOO_RUNS`).
    """
    from alter.quality_report import summarize, write_report

    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if scenarios is None:
        scenarios = DEVELOPMENT if development else HELD_OUT
    if seeds is None:
        seeds = DEVELOPMENT_SEEDS if development else HELD_OUT_SEEDS
    max_steps = None
    if quick:  # a development scenario: the smoke run never touches the held-out ones
        scenario = next(s for s in DEVELOPMENT if len(s.all_phrasings) == 3)
        scenarios = [dataclasses.replace(scenario, memorize_epochs=2)]
        seeds, max_steps = DEVELOPMENT_SEEDS[:1], 3
    if runs is None:
        runs = (ALL_RUNS if ablations else METHODS) + (ZOO_RUNS if zoo else ())
    results = run_suite(scenarios, seeds, runs=runs, workers=workers, max_steps=max_steps)
    summary = summarize(results)
    seconds = time.perf_counter() - started
    with open(os.path.join(out, "QUALITY.json"), "w") as f:
        json.dump({"scenarios": [s.to_dict() for s in scenarios], "seeds": list(seeds), "quick": quick,
                   "default_config": AlterConfig().to_dict(), "relearn": RELEARN,
                   "full_lr": {"scale": LR_SCALE, "min": LR_MIN, "max": LR_MAX},
                   "ablations": ABLATIONS if ablations else {}, "seconds": seconds, "summary": summary,
                   "results": results}, f, indent=1)
    write_report(out)
    print(f"[alter quality] wrote {out}/QUALITY.md, QUALITY.json, quality_tradeoff.png in {seconds / 60:.1f} min")
    return summary
