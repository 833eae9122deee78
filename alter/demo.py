"""``alter demo`` (``make demo``): the whole TOFU-style pipeline on a CPU in minutes.

1. Build ``tofu_mini`` (fictitious authors) and a tokenizer and tiny Llama for it.
2. Target model: memorize every fact (forget + retain + real authors + world facts).
   Retain model: the same from the same initialization, without the forget split.
3. Unlearn the forget split from copies of the target model with ALTER and every
   baseline, evaluate each with ``alter.evaluation.evaluate_tofu`` (forget quality against the
   retain model's truth ratios).
4. Repeat for each of :data:`DEMO_SEEDS` (two processes of one thread each) and write the
   mean ± std table and the per-seed rows (``results.json``) and the
   utility-vs-forget-quality plot (``tradeoff.png``, the paper's Fig. 4) into ``out``.

The numbers are whatever the run gives. Unlearning uses the library's defaults: every
method is called with nothing but ``method`` (the full-parameter learning rate is sized
from the model, ``alter.methods.params.full_lr``). A seed's run is deterministic on one machine: one thread and
deterministic algorithms, every random choice seeded. Across machines it is not: other
CPU instruction sets change the last float bits, early stops and thus the table, which is
why the demo reports the spread over seeds.
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch

from alter.config import AlterConfig
from alter.methods import DEMO_METHODS, parse_run
from alter.training.finetune import finetune
from alter.training.loop import unlearn

# 25 fictitious authors, 4 facts each, 5 forgotten: 20 forget questions, enough for the
# KS test of forget quality to tell distributions apart.
DEMO_DATA = {"num_authors": 25, "facts_per_author": 4, "forget_fraction": 0.2}
# Memorization of the facts (full-parameter training of the tiny model).
DEMO_FINETUNE = {"epochs": 30, "batch_size": 16, "lr": 3e-3}
COLUMNS = ("method", "forget_quality", "model_utility", "forget_rouge", "retain_rouge", "time_s")
DEMO_SEEDS = (0, 1, 2, 3, 4)


def _log(message: str) -> None:
    print(f"[alter demo] {message}", flush=True)


def format_table(rows: list[dict]) -> str:
    """The result rows (:func:`mean_rows`: ``column`` and ``column + "_std"``) as a
    fixed-width text table of mean ± std."""
    header = (f"{'method':<12} {'forget quality':>17} {'model utility':>15} {'forget ROUGE':>15} "
              f"{'retain ROUGE':>15} {'time (s)':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [f"{row[c]:.3f} ± {row[c + '_std']:.3f}" for c in COLUMNS[1:-1]]
        lines.append(f"{row['method']:<12} {cells[0]:>17} {cells[1]:>15} {cells[2]:>15} {cells[3]:>15} "
                     f"{row['time_s']:>9.1f}")
    return "\n".join(lines)


def mean_rows(per_seed: list[list[dict]]) -> list[dict]:
    """Per method (in the order of the first seed's rows), the mean and std
    (``column + "_std"``) over seeds of every column."""
    import numpy as np

    rows = []
    for first in per_seed[0]:
        runs = [next(r for r in seed_rows if r["method"] == first["method"]) for seed_rows in per_seed]
        row = {"method": first["method"], "seeds": len(runs)}
        for column in COLUMNS[1:]:
            values = np.array([r[column] for r in runs], dtype=np.float64)
            row[column], row[column + "_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def plot_tradeoff(rows: list[dict], path: str) -> None:
    """Model utility against forget quality (log scale), one point per method with its
    spread over seeds, named in a legend (labels next to close points would overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        quality = max(row["forget_quality"], 1e-30)  # a p-value of 0 still gets a point
        marker = "*" if row["method"] == "alter" else "o"
        ax.errorbar(quality, row["model_utility"], yerr=row.get("model_utility_std"), fmt=marker,
                    color=colors(i % 10), markersize=14 if marker == "*" else 7, capsize=3, label=row["method"])
    ax.set_xscale("log")
    ax.set_xlabel("forget quality (KS-test p-value, log scale; mean over seeds)")
    ax.set_ylabel("model utility (mean ± std over seeds)")
    ax.set_title("tofu_mini: utility vs forgetting")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def facts(split):
    """The QA rows of a split in both of its phrasings (answer and paraphrased answer).

    A tiny model trained from scratch knows a fact only in the words it was trained on;
    TOFU's truth ratio compares the paraphrased answer with perturbed ones, so the demo
    teaches (and unlearns) each fact in both phrasings, as a pretrained LLM would know it.
    """
    import datasets

    # perturbed_answer rides along: dpo's preferred answers
    answers = split.select_columns(["question", "answer", "perturbed_answer"])
    paraphrases = split.select_columns(["question", "paraphrased_answer", "perturbed_answer"]).rename_column(
        "paraphrased_answer", "answer")
    return datasets.concatenate_datasets([answers, paraphrases])


def run_seed(seed: int, quick: bool = False, methods=DEMO_METHODS) -> tuple[list[dict], dict]:
    """One seed of the demo: the rows (retain, target, then ``methods``) and the run's
    settings (``finetune``, per method ``unlearn``)."""
    import datasets

    from alter.data import qa_texts, tofu_mini
    from alter.evaluation import evaluate_tofu, forget_quality
    from alter.tiny import build_tokenizer, tiny_llama

    def log(message):
        _log(f"seed {seed}: {message}")

    # One thread (the tiny model's matrices are too small for threads to pay) and
    # deterministic kernels: the same table for the same seed on one machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = tofu_mini(**DEMO_DATA, seed=seed)
    log("tofu_mini: " + ", ".join(f"{name} {len(split)}" for name, split in data.items()))
    tokenizer = build_tokenizer(qa_texts(data))
    init = tiny_llama(tokenizer, seed=seed)
    log(f"tiny Llama: {sum(p.numel() for p in init.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    finetune_args = dict(DEMO_FINETUNE, seed=seed, progress=False)
    if quick:
        finetune_args["epochs"] = max(1, finetune_args["epochs"] // 5)

    def memorize(name, splits):
        model = copy.deepcopy(init)
        train = datasets.concatenate_datasets([facts(data[s]) for s in splits])
        log(f"training the {name} model on {len(train)} QA pairs ({' + '.join(splits)}), "
            f"{finetune_args['epochs']} epochs")
        t0 = time.perf_counter()
        finetune(model, tokenizer, train, **finetune_args)
        return model, time.perf_counter() - t0

    def evaluate(name, model, seconds, truth_ratios):
        metrics = evaluate_tofu(model, tokenizer, data, retain_model_truth_ratios=truth_ratios, batch_size=32)
        row = {"method": name, "time_s": seconds, **{c: float(metrics[c]) for c in COLUMNS[1:-1]}}
        log(f"{name}: " + ", ".join(f"{c} {row[c]:.3g}" for c in COLUMNS[1:]))
        return row

    retain_model, retain_time = memorize("retain", ["retain", "real_authors", "world_facts"])
    target, target_time = memorize("target", ["forget", "retain", "real_authors", "world_facts"])
    retain_metrics = evaluate_tofu(retain_model, tokenizer, data, batch_size=32)
    truth_ratios = retain_metrics["forget_truth_ratios"]
    retain_row = {"method": "retain", "time_s": retain_time,
                  "forget_quality": forget_quality(truth_ratios, truth_ratios),
                  **{c: float(retain_metrics[c]) for c in COLUMNS[2:-1]}}
    log("retain: " + ", ".join(f"{c} {retain_row[c]:.3g}" for c in COLUMNS[1:]))
    rows = [retain_row, evaluate("target", target, target_time, truth_ratios)]

    forget_set, retain_set = facts(data["forget"]), facts(data["retain"])
    unlearn_settings = {}
    for name in methods:
        method, params = parse_run(name)
        model = copy.deepcopy(target)
        settings = {} if params is None else {"params": params}
        unlearn_settings[name] = dict(settings)
        if quick:
            settings["max_steps"] = 4
        log(f"unlearning with {method} ({settings})")
        t0 = time.perf_counter()
        unlearn(model, tokenizer, forget_set, retain_set, method=method, seed=seed, progress=False, **settings)
        rows.append(evaluate(name, model, time.perf_counter() - t0, truth_ratios))
    return rows, {"finetune": finetune_args, "unlearn": unlearn_settings}


def _seed_job(args):
    return run_seed(*args)


def run_demo(out: str, seed: int | None = None, quick: bool = False, methods=DEMO_METHODS, workers: int = 2) -> list[dict]:
    """Run the demo; returns the table rows, mean and std over seeds (also written to
    ``out/results.json`` with every seed's rows).

    ``seed``: one seed only; default :data:`DEMO_SEEDS` (``quick``: the first), run in
    ``workers`` processes of one thread each. ``methods``: the unlearning methods to run
    (names of ``alter.methods.METHODS``, each on its default params or as
    ``"method@params"``); the retain and target models are always built
    and listed first.
    """
    methods = tuple(methods)
    for name in methods:
        parse_run(name)  # ValueError before any model is trained
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    seeds = (seed,) if seed is not None else DEMO_SEEDS[:1] if quick else DEMO_SEEDS
    jobs = [(s, quick, methods) for s in seeds]
    if workers <= 1 or len(jobs) == 1:
        outcomes = [_seed_job(job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(_seed_job, jobs))
    rows = mean_rows([seed_rows for seed_rows, _ in outcomes])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"seeds": list(seeds), "rows": rows,
                   "per_seed": {str(s): seed_rows for s, (seed_rows, _) in zip(seeds, outcomes)},
                   "config": AlterConfig().to_dict(), "finetune": {k: v for k, v in outcomes[0][1]["finetune"].items()
                                                                   if k != "seed"},
                   "unlearn": outcomes[0][1]["unlearn"]}, f, indent=2)
    plot_tradeoff(rows, os.path.join(out, "tradeoff.png"))
    print(f"seeds {', '.join(map(str, seeds))}: mean ± std")
    print(format_table(rows))
    _log(f"wrote {out}/results.json and {out}/tradeoff.png in {time.perf_counter() - started:.0f} s")
    return rows
