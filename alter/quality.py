"""``alter quality``: does the default ``unlearn`` call unlearn, on data it was never tuned on?

For each scenario of :mod:`alter.scenarios` and each seed: a tiny Llama memorizes every
row (forget and retain; full-parameter :func:`alter.train.finetune`), giving the target
model; then each method runs from a copy of it with ``unlearn(model, tokenizer, forget,
retain, method=...)`` and nothing else (the ablations of ALTER change one
:class:`AlterConfig` field). Metrics, before and after:

* fact accuracy on forget and retain: teacher-forced argmax accuracy over the tokens of
  the fact values only (:func:`alter.scenarios.fact_token_mask`), micro-averaged;
* for the ``tofu`` scenario (TOFU format, :func:`alter.data.tofu_mini`): forget quality and
  model utility (:func:`alter.eval.evaluate_tofu`, against a retain model).

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

from alter.config import AlterConfig
from alter.data import collate
from alter.scenarios import (DEVELOPMENT, DEVELOPMENT_SEEDS, HELD_OUT, HELD_OUT_SEEDS, Scenario, build_scenario,
                             fact_token_mask)
from alter.train import METHODS, finetune, unlearn

# ALTER with one component off: the AlterConfig fields that switch it.
ABLATIONS = {
    "alter-no-entropy-routing": {"tau_high": 0.01, "k_high": 1},  # every token routed as a low-entropy one
    "alter-nll-ascent": {"forget_loss": "nll_ascent"},  # IHL replaced by NLL ascent
    "alter-no-structural": {"lam": 0.0},
    "alter-a-all-tokens": {"a_learns_from_high_entropy_only": False},
}
ALL_RUNS = METHODS + tuple(ABLATIONS)
MEMORIZE = {"batch_size": 16, "lr": 3e-3}


@torch.no_grad()
def fact_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """Teacher-forced argmax accuracy over the fact-value tokens of ``rows`` (micro-average)."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    correct = total = 0
    for start in range(0, len(rows), batch_size):
        examples = []
        for row in rows[start:start + batch_size]:
            ids, mask = fact_token_mask(tokenizer, row)
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "fact": [int(m) for m in mask]})
        batch = collate(examples, pad)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predicted = logits[:, :-1].argmax(-1).cpu()
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
