"""``alter demo`` (``make demo``): the whole TOFU-style pipeline on a CPU in minutes.

1. Build ``tofu_mini`` (fictitious authors) and a tokenizer and tiny Llama for it.
2. Target model: memorize every fact (forget + retain + real authors + world facts).
   Retain model: the same from the same initialization, without the forget split.
3. Unlearn the forget split from copies of the target model with ALTER and every
   baseline, evaluate each with ``alter.evaluation.evaluate_tofu`` (forget quality against the
   retain model's truth ratios), and write the table (``results.json``) and the
   utility-vs-forget-quality plot (``tradeoff.png``, the paper's Fig. 4) into ``out``.

The numbers are whatever the run gives. Unlearning uses the library's defaults: every
method is called with nothing but ``method`` (the full-parameter learning rate is sized
from the model, ``alter.methods.params.full_lr``). The run is deterministic for a seed: one thread and
deterministic algorithms, every random choice seeded (machines with different CPU
instruction sets can still differ in the last float bits).
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch

from alter.config import AlterConfig
from alter.methods import METHODS
from alter.training.finetune import finetune
from alter.training.loop import unlearn

# 25 fictitious authors, 4 facts each, 5 forgotten: 20 forget questions, enough for the
# KS test of forget quality to tell distributions apart.
DEMO_DATA = {"num_authors": 25, "facts_per_author": 4, "forget_fraction": 0.2}
# Memorization of the facts (full-parameter training of the tiny model).
DEMO_FINETUNE = {"epochs": 30, "batch_size": 16, "lr": 3e-3}
COLUMNS = ("method", "forget_quality", "model_utility", "forget_rouge", "retain_rouge", "time_s")


def _log(message: str) -> None:
    print(f"[alter demo] {message}", flush=True)


def format_table(rows: list[dict]) -> str:
    """The result rows as a fixed-width text table."""
    header = f"{'method':<12} {'forget quality':>15} {'model utility':>14} {'forget ROUGE':>13} {'retain ROUGE':>13} {'time (s)':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:<12} {row['forget_quality']:>15.3g} {row['model_utility']:>14.3f} "
            f"{row['forget_rouge']:>13.3f} {row['retain_rouge']:>13.3f} {row['time_s']:>9.1f}"
        )
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path: str) -> None:
    """Model utility against forget quality (log scale), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, row in enumerate(rows):
        quality = max(row["forget_quality"], 1e-30)  # a p-value of 0 still gets a point
        marker = "*" if row["method"] == "alter" else "o"
        ax.scatter(quality, row["model_utility"], s=120 if marker == "*" else 50, marker=marker)
        # Alternate label sides so that methods with equal scores stay readable.
        offset = (6, 6) if i % 2 == 0 else (6, -12)
        ax.annotate(row["method"], (quality, row["model_utility"]), textcoords="offset points", xytext=offset)
    ax.set_xscale("log")
    ax.set_xlabel("forget quality (KS-test p-value, log scale)")
    ax.set_ylabel("model utility")
    ax.set_title("tofu_mini: utility vs forgetting")
    ax.grid(True, alpha=0.3)
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


def run_demo(out: str, seed: int = 0, quick: bool = False, methods=METHODS) -> list[dict]:
    """Run the demo; returns the table rows (also written to ``out/results.json``).

    ``methods``: the unlearning methods to run (a subset of ``alter.methods.METHODS``); the
    retain and target models are always built and listed first.
    """
    import datasets

    from alter.data import qa_texts, tofu_mini
    from alter.evaluation import evaluate_tofu, forget_quality
    from alter.tiny import build_tokenizer, tiny_llama

    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"run_demo: methods must be among {METHODS}, got unknown {unknown}")
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    # One thread (the tiny model's matrices are too small for threads to pay) and
    # deterministic kernels: the same table for the same seed on every machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = tofu_mini(**DEMO_DATA, seed=seed)
    _log("tofu_mini: " + ", ".join(f"{name} {len(split)}" for name, split in data.items()))
    tokenizer = build_tokenizer(qa_texts(data))
    init = tiny_llama(tokenizer, seed=seed)
    _log(f"tiny Llama: {sum(p.numel() for p in init.parameters()) / 1e6:.2f}M parameters, "
         f"vocabulary {len(tokenizer)}")
    finetune_args = dict(DEMO_FINETUNE, seed=seed, progress=False)
    if quick:
        finetune_args["epochs"] = max(1, finetune_args["epochs"] // 5)

    def memorize(name, splits):
        model = copy.deepcopy(init)
        train = datasets.concatenate_datasets([facts(data[s]) for s in splits])
        _log(f"training the {name} model on {len(train)} QA pairs ({' + '.join(splits)}), "
             f"{finetune_args['epochs']} epochs")
        t0 = time.perf_counter()
        finetune(model, tokenizer, train, **finetune_args)
        return model, time.perf_counter() - t0

    def evaluate(name, model, seconds, truth_ratios):
        metrics = evaluate_tofu(model, tokenizer, data, retain_model_truth_ratios=truth_ratios, batch_size=32)
        row = {"method": name, "time_s": seconds, **{c: float(metrics[c]) for c in COLUMNS[1:-1]}}
        _log(f"{name}: " + ", ".join(f"{c} {row[c]:.3g}" for c in COLUMNS[1:]))
        return row, metrics

    retain_model, retain_time = memorize("retain", ["retain", "real_authors", "world_facts"])
    target, target_time = memorize("target", ["forget", "retain", "real_authors", "world_facts"])
    retain_metrics = evaluate_tofu(retain_model, tokenizer, data, batch_size=32)
    truth_ratios = retain_metrics["forget_truth_ratios"]
    retain_row = {"method": "retain", "time_s": retain_time,
                  "forget_quality": forget_quality(truth_ratios, truth_ratios),
                  **{c: float(retain_metrics[c]) for c in COLUMNS[2:-1]}}
    _log("retain: " + ", ".join(f"{c} {retain_row[c]:.3g}" for c in COLUMNS[1:]))
    rows = [retain_row, evaluate("target", target, target_time, truth_ratios)[0]]

    forget_set, retain_set = facts(data["forget"]), facts(data["retain"])
    unlearn_settings = {}
    for method in methods:
        model = copy.deepcopy(target)
        settings = {}
        unlearn_settings[method] = dict(settings)
        if quick:
            settings["max_steps"] = 4
        _log(f"unlearning with {method} ({settings})")
        t0 = time.perf_counter()
        unlearn(model, tokenizer, forget_set, retain_set, method=method, seed=seed, progress=False, **settings)
        rows.append(evaluate(method, model, time.perf_counter() - t0, truth_ratios)[0])

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": rows, "config": AlterConfig().to_dict(), "finetune": finetune_args,
                   "unlearn": unlearn_settings}, f, indent=2)
    plot_tradeoff(rows, os.path.join(out, "tradeoff.png"))
    print(format_table(rows))
    _log(f"wrote {out}/results.json and {out}/tradeoff.png in {time.perf_counter() - started:.0f} s")
    return rows
