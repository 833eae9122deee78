"""What an :func:`~alter.training.loop.unlearn` run did: :class:`UnlearnReport`
(``model.unlearn_report``) and the routing shares it measures."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from alter.adapters import alter_layers
from alter.files import staged_directory
from alter.methods.params import RETENTION_EXPERT
from alter.methods.data import eval_forwards
from alter.training.args import DEFAULT_EARLY_STOP_SHARE
from alter.training.schedule import LabelScores, label_scores
from alter_kernels import route


def forget_expert_weight(router_logits: torch.Tensor, entropy: torch.Tensor, config) -> torch.Tensor:
    """The routing weight a router gives the forget experts (1..N-1), gating on its own as
    at inference: router_logits [T, N], entropy [T] -> [T] float32."""
    weights, experts = route(router_logits, entropy, config.entropy_threshold, config.tau_high, config.tau_low,
                             config.k_high, config.k_low, backend=config.backend)
    return (weights * (experts > RETENTION_EXPERT)).sum(-1).float()


def layer_routing_shares(model, examples: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Per patched layer (its module name, in the model's order): the share of the routing
    weight that its router, gating on its own (as at inference, base-model entropy from
    ``example["entropy"]``), gives the forget experts (1..N-1) on the positions
    ``example["route_mask"]`` marks, averaged over those positions. Floats in [0, 1]
    (NaN when no position is marked). Under ``routing="sequence"`` every layer gates by
    the call's route, so each layer's share is the route's."""
    config = model.alter_config
    layers = alter_layers(model)
    shares: dict[str, torch.Tensor] = {}
    sequence = config.routing == "sequence"

    def hook_of(name):
        def hook(router, inputs, logits):
            shares[name] = forget_expert_weight(logits, inputs[1], config)
        return hook

    handles = [] if sequence else [layer.router.register_forward_hook(hook_of(name)) for name, layer in layers.items()]
    totals = dict.fromkeys(layers, 0.0)
    count = 0.0
    try:
        for _, batch, _output in eval_forwards(model, examples, pad_id, batch_size):  # the hooks fill shares
            if sequence:
                shares = dict.fromkeys(layers, (model.alter_tracker.last_call.token_route > RETENTION_EXPERT).float())
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


# The verdict: "forgotten" when the forget tokens' mean probability fell to at most
# FORGOTTEN_RATIO of its start and at most DEFAULT_EARLY_STOP_SHARE of the tokens predicted
# at the start are still predicted (weighted); "not forgotten" when the probability kept more
# than FORGET_WARNING_RATIO of its start, with most tokens still predicted, and the early
# stop did not fire; "partly forgotten" between.
FORGOTTEN, PARTLY_FORGOTTEN, NOT_FORGOTTEN = "forgotten", "partly forgotten", "not forgotten"
FORGOTTEN_RATIO = 0.5
FORGET_WARNING_RATIO = 0.9
REPORT_FILES = ("report.json", "report.md")

# One line for each term the report may print; a loss no method here logs gets a generic one.
GLOSSARY = {
    "router warm-up": "steps that train only the routers (which tokens go to which expert) before unlearning",
    "unlearning steps": "optimizer steps of the unlearning objective; max_steps counts these",
    "ended": "why the unlearning steps stopped: the early stop, the step cap (max_steps) or the run's length",
    "verdict": f"{FORGOTTEN}: probability <= {FORGOTTEN_RATIO}x its start and still predicted <= "
               f"{DEFAULT_EARLY_STOP_SHARE}; {NOT_FORGOTTEN}: probability > {FORGET_WARNING_RATIO}x its start, "
               f"still predicted > {DEFAULT_EARLY_STOP_SHARE}, no early stop; {PARTLY_FORGOTTEN}: between",
    "forget-token probability": "mean probability the model gives each labelled token of the forget set "
                                "(teacher forced), at the start -> at the end",
    "still predicted": "share of the forget tokens the model predicted (top-1) at the start that it still "
                       "predicts: of those the retain rows do not predict (config.forget_tokens 'unpredictable'; "
                       "under config.forget_floor, those above their floor at the start still above it), "
                       "or of all, each weighted by how surprising it is after the word before it (facts weigh "
                       "more than template words); the early stop compares it with early_stop_share",
    "loss first/last/min": "a loss's value at the first and last step that logged it, and its smallest",
    "forget": "loss on the forget set (pushed up: ascent, IHL or NPO, by method)",
    "retain": "loss on the retain set (kept low: next-token NLL)",
    "kept": "next-token NLL of the forget rows' tokens the retain rows predict (a BPE word's continuation, a "
            "template word), kept low as retained tokens are (under the floor: those below it, held up to it; 0 "
            "at a step with none)",
    "route": "routing loss: trains the routers to send forget tokens to the forget experts and the rest to the "
             "retention expert",
    "structural": "structural term: keeps the retention expert's update away from the forget experts' "
                  "(near 0 once they are apart)",
    "loss": "the total minimized in a step (the weighted sum of the terms)",
    "routing": "share of the routing weight the trained routers give the forget experts on forget tokens "
               "(high is good) and on retained tokens (the leak, low is good)",
}
_LOSS_FALLBACK = "a loss term of the method (docs/training.md)"


@dataclass
class UnlearnReport:
    """What an :func:`unlearn` run did (``model.unlearn_report``).

    ``steps``: unlearning steps run in this call, and ``router_warmup`` the router-only
    steps run before them (apart: ``max_steps`` counts unlearning steps only); ``losses``:
    per loss name (forget, retain, route, ...) its ``first``/``last``/``min`` over the steps
    that logged it; ``forget_routing_share``: the share of the routing weight that the
    trained routers, gating on their own, give the forget experts on the forget positions
    that teach them (docs/training.md, "Routing targets"), and ``retain_leak_share`` the
    same on every retained token (None for methods without forget experts);
    ``forget_probability_before/after``: the mean probability of the forget set's labelled
    tokens; ``forget_kept_share``: the share of the forget tokens the model predicted
    (argmax) at the start that it still predicts, weighted by
    :func:`~alter.training.schedule.bigram_surprisal`, at the end and, in
    ``forget_kept_history``, as ``(unlearning step, share)`` at each early-stop check;
    ``stopped_early``: whether the run stopped there (docs/training.md, "Run length and
    early stop"); ``seconds``: wall time; ``ended``: why the unlearning steps ended, in
    words; ``forget_routing_by_layer`` and
    ``retain_leak_by_layer``: the two routing shares per patched layer
    (:func:`layer_routing_shares`; their means are the two shares above). :attr:`verdict` sums it up; :meth:`save` writes ``report.json`` and ``report.md``.
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
    ended: str = ""
    forget_routing_by_layer: dict | None = None
    retain_leak_by_layer: dict | None = None

    @property
    def probability_ratio(self) -> float:
        """The forget tokens' mean probability at the end over its start."""
        return self.forget_probability_after / max(self.forget_probability_before, 1e-30)

    @property
    def verdict(self) -> str:
        """``"forgotten"``, ``"partly forgotten"`` or ``"not forgotten"`` (see :data:`GLOSSARY`)."""
        if self.probability_ratio <= FORGOTTEN_RATIO and self.forget_kept_share <= DEFAULT_EARLY_STOP_SHARE:
            return FORGOTTEN
        if (self.probability_ratio > FORGET_WARNING_RATIO and self.forget_kept_share > DEFAULT_EARLY_STOP_SHARE
                and not self.stopped_early):
            return NOT_FORGOTTEN
        return PARTLY_FORGOTTEN

    def _lines(self) -> list[tuple[str, str]]:
        """(glossary term, line) of every line of the report."""
        lines = [("unlearning steps", f"unlearn [{self.method}]: {self.router_warmup} router warm-up steps, then "
                                      f"{self.steps} unlearning steps, in {self.seconds:.1f} s"),
                 ("ended", f"  ended: {self.ended}" if self.ended else ""),
                 ("verdict", f"  verdict: {self.verdict}: forget-token probability {self.forget_probability_before:.3g}"
                             f" -> {self.forget_probability_after:.3g} ({self.probability_ratio:.2f}x its start); "
                             f"{self.forget_kept_share:.2f} still predicted")]
        if self.losses:
            lines.append(("loss first/last/min", "  losses:"))
        for name, values in self.losses.items():
            lines.append((name, f"    {name:<10} first {values['first']:.4g}  last {values['last']:.4g}  "
                                f"min {values['min']:.4g}"))
        if self.forget_routing_share is not None:
            lines.append(("routing", f"  routing: forget tokens -> forget experts {self.forget_routing_share:.2f}, "
                                     f"retained tokens leaking there {self.retain_leak_share:.2f}"))
        return [(term, line) for term, line in lines if line]

    def glossary(self) -> dict[str, str]:
        """The meaning of each term the report prints: {term: one line}."""
        terms = ["router warm-up"] * (self.router_warmup > 0) + [term for term, _ in self._lines()]
        terms.insert(terms.index("verdict") + 1, "forget-token probability")
        terms.insert(terms.index("verdict") + 2, "still predicted")
        return {term: GLOSSARY.get(term, _LOSS_FALLBACK) for term in dict.fromkeys(terms)}

    def __str__(self) -> str:
        return "\n".join([line for _, line in self._lines()] + ["glossary:"]
                         + [f"  {term}: {meaning}" for term, meaning in self.glossary().items()])

    def to_dict(self) -> dict:
        """Every field, the verdict and the glossary (JSON-ready)."""
        return {**dataclasses.asdict(self), "verdict": self.verdict, "glossary": self.glossary()}

    def save(self, directory: str) -> None:
        """``directory/report.json`` (:meth:`to_dict`) and ``directory/report.md`` (the
        text), written together (:func:`alter.files.staged_directory`)."""
        with staged_directory(directory) as staging:
            with open(os.path.join(staging, REPORT_FILES[0]), "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)
            with open(os.path.join(staging, REPORT_FILES[1]), "w", encoding="utf-8") as f:
                f.write(f"# Unlearning report\n\n```\n{self}\n```\n")


def _report(model, method, forget_examples, retain_examples, pad_id, batch_size, history, start_step,
            router_warmup, forget_start: LabelScores, fact_weight, kept_history, forget_end: LabelScores | None,
            seconds, ended: str = "") -> UnlearnReport:
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
    return UnlearnReport(method.name, len(history) - warmup_run, warmup_run, losses, *shares,
                         forget_start.probability, forget_end.probability,
                         forget_end.kept_share(forget_start, fact_weight), kept_history, stopped_early, seconds, ended,
                         *by_layer)
