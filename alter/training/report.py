"""What an :func:`~alter.training.loop.unlearn` run did: :class:`UnlearnReport`
(``model.unlearn_report``) and the routing shares it measures."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alter.adapters import alter_layers
from alter.methods.base import RETENTION_EXPERT
from alter.methods.data import eval_forwards
from alter.training.schedule import LabelScores, label_scores
from alter_kernels import route


def layer_routing_shares(model, examples: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Per patched layer (its module name, in the model's order): the share of the routing
    weight that its router, gating on its own (as at inference, base-model entropy from
    ``example["entropy"]``), gives the forget experts (1..N-1) on the positions
    ``example["route_mask"]`` marks, averaged over those positions. Floats in [0, 1]
    (NaN when no position is marked)."""
    config = model.alter_config
    layers = alter_layers(model)
    shares: dict[str, torch.Tensor] = {}

    def hook_of(name):
        def hook(router, inputs, logits):
            weights, experts = route(logits, inputs[1], config.entropy_threshold, config.tau_high, config.tau_low,
                                     config.k_high, config.k_low, backend=config.backend)
            shares[name] = (weights * (experts > RETENTION_EXPERT)).sum(-1).float()
        return hook

    handles = [layer.router.register_forward_hook(hook_of(name)) for name, layer in layers.items()]
    totals = dict.fromkeys(layers, 0.0)
    count = 0.0
    try:
        for _, batch, _output in eval_forwards(model, examples, pad_id, batch_size):  # the hooks fill shares
            mask = (batch["route_mask"].bool() & batch["attention_mask"].bool()).reshape(-1)
            for name in layers:
                totals[name] += float(shares[name].reshape(-1)[mask].sum())
            count += float(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / count if count else float("nan") for name, total in totals.items()}


def routing_shares(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """:func:`layer_routing_shares` averaged over the layers: a float in [0, 1] (NaN when
    no position is marked)."""
    return float(np.mean(list(layer_routing_shares(model, examples, pad_id, batch_size).values())))


@dataclass
class UnlearnReport:
    """What an :func:`unlearn` run did (``model.unlearn_report``).

    ``steps``: optimizer steps run in this call (``router_warmup`` of them router-only);
    ``losses``: per loss name (forget, retain, route, ...) its ``first``/``last``/``min``
    over the steps that logged it; ``forget_routing_share``: the share of the routing
    weight that the trained routers, gating on their own, give the forget experts on the
    forget positions that teach them (docs/training.md, "Routing targets"), and
    ``retain_leak_share`` the same on every retained token (None for methods without
    forget experts); ``forget_probability_before/after``: the mean probability of the
    forget set's labelled tokens; ``forget_kept_share``: the share of the forget tokens the
    model predicted (argmax) at the start that it still predicts, weighted by
    :func:`~alter.training.schedule.bigram_surprisal`, at the end and, in
    ``forget_kept_history``, as ``(step, share)`` at each early-stop check;
    ``stopped_early``: whether the run stopped there (docs/training.md, "Run length and
    early stop"); ``seconds``: wall time; ``forget_routing_by_layer`` and
    ``retain_leak_by_layer``: the two routing shares per patched layer
    (:func:`layer_routing_shares`; their means are the two shares above).
    """

    method: str
    steps: int
    router_warmup: int
    losses: dict
    forget_routing_share: float | None
    retain_leak_share: float | None
    forget_probability_before: float
    forget_probability_after: float
    forget_kept_share: float
    forget_kept_history: list
    stopped_early: bool
    seconds: float
    forget_routing_by_layer: dict | None = None
    retain_leak_by_layer: dict | None = None

    def __str__(self) -> str:
        lines = [f"unlearn [{self.method}]: {self.steps} steps ({self.router_warmup} router warm-up) "
                 f"in {self.seconds:.1f} s"]
        for name, values in self.losses.items():
            lines.append(f"  {name:<10} first {values['first']:.4g}  last {values['last']:.4g}  min {values['min']:.4g}")
        lines.append(f"  forget-token probability {self.forget_probability_before:.3g} -> "
                     f"{self.forget_probability_after:.3g}; still predicted {self.forget_kept_share:.2f}"
                     + (" (early stop)" if self.stopped_early else ""))
        if self.forget_routing_share is not None:
            lines.append(f"  routing: forget tokens -> forget experts {self.forget_routing_share:.2f}, "
                         f"retained tokens leaking there {self.retain_leak_share:.2f}")
        return "\n".join(lines)


def _report(model, method, forget_examples, retain_examples, pad_id, batch_size, history, start_step,
            router_warmup, forget_start: LabelScores, fact_weight, kept_history, forget_end: LabelScores | None,
            seconds) -> UnlearnReport:
    """The run's :class:`UnlearnReport`; ``method``: the run's
    :class:`~alter.methods.base.Method`; ``forget_end``: the early stop's scores of the
    forget set when the run stopped early (the model has not changed since), else None."""
    losses: dict[str, dict] = {}
    for logs in history:
        for name, value in logs.items():
            entry = losses.setdefault(name, {"first": value, "last": value, "min": value})
            entry["last"], entry["min"] = value, min(entry["min"], value)
    by_layer = (None, None)
    # Routing shares mean something only where the forget set has its own experts.
    if method.has_forget_experts:
        by_layer = (layer_routing_shares(model, forget_examples, pad_id, batch_size),
                    layer_routing_shares(model, retain_examples, pad_id, batch_size))
    shares = [None if layers is None else float(np.mean(list(layers.values()))) for layers in by_layer]
    warmup_run = max(0, min(router_warmup, start_step + len(history)) - start_step)
    stopped_early = forget_end is not None
    if forget_end is None:
        forget_end = label_scores(model, forget_examples, pad_id, batch_size)
    return UnlearnReport(method.name, len(history), warmup_run, losses, *shares, forget_start.probability,
                         forget_end.probability, forget_end.kept_share(forget_start, fact_weight), kept_history,
                         stopped_early, seconds, *by_layer)
