"""How long a run trains: its length when ``epochs`` / ``router_warmup`` are not given,
and the early stop's scores of the forget set (docs/training.md, "Run length and early
stop")."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from alter.data import IGNORE_INDEX
from alter.methods.data import eval_forwards
from alter.methods.losses import labelled_rows, shift_targets

# Run sizing when ``epochs`` / ``router_warmup`` are not given (docs/training.md, "Run
# length and early stop").
DEFAULT_EPOCHS = 10
MIN_STEPS = 100
MAX_DEFAULT_STEPS = 1000
MAX_ROUTER_WARMUP = 200


def run_length(n_forget: int, batch_size: int, epochs: int | None, router_warmup: int | None,
               adapter: bool) -> tuple[int, int]:
    """(router warm-up steps, unlearning steps) of a run (docs/training.md, "Run length
    and early stop")."""
    per_epoch = math.ceil(n_forget / batch_size)
    if epochs is None:
        steps = max(per_epoch, MIN_STEPS, min(DEFAULT_EPOCHS * per_epoch, MAX_DEFAULT_STEPS))
    else:
        steps = epochs * per_epoch
    if router_warmup is None:
        router_warmup = min(steps, MAX_ROUTER_WARMUP) if adapter else 0
    return router_warmup, steps


@dataclass
class LabelScores:
    """How a model scores the labelled tokens of a set of examples (teacher forced).

    ``probability``: their mean probability; ``predicted``: bool ``[n_labelled]``, whether
    each is the argmax, in example order (comparable across calls on the same examples)."""

    probability: float
    predicted: torch.Tensor

    def kept_share(self, start: "LabelScores", weight: torch.Tensor | None = None) -> float:
        """Share of the tokens predicted in ``start`` that are still predicted here, each
        counted with ``weight`` (float ``[n_labelled]``; default 1); 1.0 when ``start``
        predicted none."""
        weight = torch.ones(len(self.predicted)) if weight is None else weight
        total = float((weight * start.predicted).sum())
        return float((weight * (self.predicted & start.predicted)).sum()) / total if total > 0 else 1.0


def bigram_surprisal(examples: list[dict], corpus: list[dict]) -> torch.Tensor:
    """``-log2 p(token | previous token)`` of each labelled token of ``examples`` (in
    :class:`LabelScores` order), p counted over the labelled tokens of ``corpus``: float
    ``[n_labelled]``. Template words that follow from the word before them weigh ~0, the
    values of facts several bits."""
    pairs, previous = Counter(), Counter()
    for example in corpus:
        ids, labels = example["input_ids"], example["labels"]
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                pairs[ids[t - 1], labels[t]] += 1
                previous[ids[t - 1]] += 1
    weights = [-math.log2(pairs[ids[t - 1], labels[t]] / previous[ids[t - 1]])
               for ids, labels in ((e["input_ids"], e["labels"]) for e in examples)
               for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    return torch.tensor(weights, dtype=torch.float64)


def label_scores(model, examples: list[dict], pad_id: int, batch_size: int) -> LabelScores:
    """:class:`LabelScores` of ``model`` on ``examples`` (eval mode, no gradients). Examples
    with a ``forget_floor`` (``AlterConfig.forget_floor``) count a token as still known
    (``predicted``) while its log-probability is above its floor, not while it is the argmax."""
    total = 0.0
    predicted = []
    # In example order: ``predicted`` is compared token by token across calls.
    for _, batch, out in eval_forwards(model, examples, pad_id, batch_size):
        labelled, logprob, labels, keep = labelled_rows(out.logits, batch["labels"], torch.float32)
        total += float(logprob.exp().sum())
        if "forget_floor" in batch:
            known = logprob > shift_targets(batch["forget_floor"], 0.0)[keep]
        else:
            known = labelled.argmax(-1) == labels
        predicted.append(known.cpu())
    predicted = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.bool)
    return LabelScores(total / max(len(predicted), 1), predicted)
