"""Unlearning: the ALTER trainer and the baselines, in one harness.

:func:`unlearn` takes a causal LM, its tokenizer, a forget set and a retain set
(``datasets.Dataset`` with ``question``/``answer`` columns, as TOFU, or a ``text`` column,
as WMDP/MUSE corpora) and returns the unlearned model. This module holds the loop,
checkpoints and the run report; each method is a module of :mod:`alter.methods` (its
registry, bases, losses, data preparation and the :class:`~alter.methods.args.UnlearnArgs`
dataclass), and :mod:`alter.distributed` runs the loop on several processes. Methods:

``"alter"``
    The paper's method. Before training, one no-grad pass of the base model gives every
    token's Tsallis entropy (cached for the whole run: the paper observes that token
    entropy is stable under fine-tuning, so the layers read it through
    ``precomputed_entropy``) and the forget set's features (mean-pooled last hidden
    states), which k-means splits into ``num_experts - 1`` sub-domains: the routing
    target of a forget sample of sub-domain d is forget expert d, of a retained sample the
    retention expert 0. Each step minimizes ``beta * IHL(forget, low-entropy tokens) +
    gamma * NLL(retain) + lam * structural + routing loss``. A learns at ``lr_A`` (from
    every token by default; from high-entropy tokens only with
    ``config.a_learns_from_high_entropy_only``, the paper's setting), B at ``lr_B``, the
    routers at ``router_lr`` (default ``lr_B``). After training the router gates on its
    own (no forced route).

    *Training routes* (``config.train_routes``). ``"router"`` (default): the forget and
    retain losses run with the routers gating on their own, as at inference; the forget
    loss's gradient reaches the forget experts only (never B_0), the retain loss's every
    expert a retained token is routed to. A per-token router is imperfect: on the
    development scenarios of ``alter quality`` the trained routers sent 20-50% of the
    routing weight of forget tokens to the forget experts and let 2-14% of retained
    tokens' weight leak there. Under the paper's ``"forced"`` routes (every forget token to
    its forget expert, every retained token to B_0) the experts learn a split that
    inference does not reproduce: forget facts survive wherever the router keeps them on
    B_0, and retained facts are destroyed wherever they leak to a forget expert trained
    never to see them (zeroing the forget experts restored retain accuracy fully:
    dev-authors-qa 0.88 -> 1.00). Trained under their own routes, the forget experts learn
    to forget what reaches them and, through the retain loss, to keep what leaks to them
    (dev-authors-qa, lr_B 1e-2: forget 0.00 / retain 0.88 forced; the retain loss routed
    alone 0.08 / 0.99; dev-companies-qa: the forget loss routed too took forget from 0.75
    to 0.48).

    *Routing targets* (:func:`mark_routing_targets`). A forget position teaches the router
    its forget expert iff its context (the tokens up to it) is the prefix of no retained
    example; every retained position teaches the retention expert. Before that point
    (BOS, a question template, a sentence opening that retained rows share) no router can
    tell the rows apart, and text rows would otherwise make every template word a forget
    target. The same rule covers QA rows (targets start inside the question, at the
    subject) and text rows. Measured (dev-authors-qa, 200 steps): answer positions only
    forget 0.08 / retain 0.88, all forget tokens 0.00 / 0.80, the prefix rule 0.00 / 0.88.
    A linear probe bounds what a per-token router can do: on dev-companies-qa the
    best linear classifier of a layer's input recalls 76-85% of these positions at 20-55%
    false positives, and 87-100% at 4-29% on the positions that predict a fact value;
    n-gram novelty rules that try to isolate those were not better end to end. Each set's
    routing loss is weighted by its share of the data (weighting the sets equally raised
    the leak and cost retain accuracy: dev-authors-text 0.77 -> 0.48).

    *Run length.* Without ``epochs``, a run has at most ``max(1 epoch, MIN_STEPS,
    min(DEFAULT_EPOCHS epochs, MAX_DEFAULT_STEPS))`` unlearning steps (a 10-row forget set
    gets 100 steps, not the ~8 of 3 epochs), preceded by a router warm-up of as many
    router-only steps, at most ``MAX_ROUTER_WARMUP``. *Early stop*
    (``early_stop_share``, default 0.4, every method): after each pass over the forget
    set the run measures which of the forget tokens the model predicted (argmax) at the
    start it still predicts, each token weighted by its bigram surprisal over the run's
    data (:func:`bigram_surprisal`: a template word that follows from the word before it
    weighs ~0 bits, a fact's value several), and stops once that weighted share is at most
    ``early_stop_share``. A fixed length over-forgets small sets: on tofu_mini (seeds 0
    and 1, development) 100 unlearning steps took model utility to 0.75-0.79x the
    target's, while the share crossed 0.4 after 50-60 steps at 0.92-0.93x with forget
    quality 0.83; unweighted, the answers' template words kept the share above 0.6 until
    the facts were gone (forget ROUGE at the retain model's). On the development
    scenarios (seed 0, alter) the stop at 0.4 left forget accuracy at 0.25-0.41x its
    start (0.0 on dev-authors-text) and retain accuracy at 0.91-1.0x. The check costs one
    no-grad pass over the forget set per epoch (about an eighth of the epoch's training
    passes). With the stop in place the cap is 1000 steps (10 epochs of a 400-row set);
    at 400, as before, it cut large sets short of the stop: development islands-qa-280
    (280 forget rows, seed 0) ended at 0.49x forget accuracy after 400 steps and reached
    the share by 420-490 steps (0.38-0.42x, retain 0.94-0.97x); villages-text-400 (seeds
    0 and 1, alter and asym_lora) stopped at 400-500 steps (0.26-0.34x, retain >= 0.91x).
``"asym_lora"``
    AsymLoRA without entropy: the same routes and routing targets, IHL with uniform
    token weights, A learning from every token, no structural term.
``"lora"``
    One plain LoRA adapter trained with the GradDiff objective, realized as AsymLoRA with
    every token forced to expert 0 and one expert kept per token at inference.
``"grad_ascent"``, ``"grad_diff"``, ``"npo"``
    Full-parameter baselines as in TOFU's harness: ascent on the forget NLL; ascent on
    the forget NLL plus descent on the retain NLL; Negative Preference Optimization
    against the log-probabilities of the frozen starting model (computed once).

The structural term of eq. 8, ``E_H[||grad_A S_q(x_t)||^2]`` over high-entropy tokens H,
needs a double backward and one backward per token: ``structural="exact"`` computes it
on the eager path (small models only). The default ``structural="surrogate"`` is
``E_H[(S_q^adapted(x_t) - S_q^base(x_t))^2]``: it penalizes the same thing (the adapter
moving the entropy of structural tokens) at the cost of one entropy read of the logits.

Runs are reproducible from ``seed``: data order is a function of (seed, epoch), and a
run with ``output_dir`` and ``save_every`` writes a checkpoint (trainable parameters,
optimizer, step, RNG state) from which ``resume=True`` continues to the same result as
an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from alter.config import AlterConfig
from alter.data import IGNORE_INDEX, pad_id_of
from alter.files import first_line, staged_directory
from alter.distributed import Engine, launched
from alter.methods import ADAPTER_METHODS, METHODS, build, method_class  # noqa: F401 (the first two: public names)
from alter.methods.args import (DEFAULT_EARLY_STOP_SHARE, STRUCTURAL_MODES, UnlearnArgs,  # noqa: F401
                                check_positive as _check_positive)
from alter.methods.base import RETENTION_EXPERT
# The data preparation and losses live in alter.methods; these are alter.train's public names.
from alter.methods.data import (  # noqa: F401
    _batch,
    _epoch_order,
    _examples_digest,
    _model_inputs,
    _step_indices,
    base_model_pass,
    batches,
    check_dataset,
    check_rows,
    encode_dataset,
    mark_routing_targets,
    model_context_length,
    split_subdomains,
)
from alter.methods.losses import (  # noqa: F401
    _shift,
    npo_loss,
    sequence_logprob,
    structural_exact,
    structural_surrogate,
    token_nll,
)
from alter.model import evaluating, is_patched, precomputed_entropy

CHECKPOINT_FILE = "checkpoint.pt"
RUN_ARGS_FILE = "unlearn_args.json"

# Run sizing when ``epochs`` / ``router_warmup`` are not given (module doc, "Run length").
DEFAULT_EPOCHS = 10
MIN_STEPS = 100
MAX_DEFAULT_STEPS = 1000
MAX_ROUTER_WARMUP = 200
# The run report warns when the forget tokens' mean probability kept more than this
# fraction of its starting value.
FORGET_WARNING_RATIO = 0.9


def routing_shares(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Share of the routing weight that the model's routers, gating on their own (as at
    inference, base-model entropy from ``example["entropy"]``), give the forget experts
    (1..N-1) on the positions ``example["route_mask"]`` marks, averaged over layers and
    positions. A float in [0, 1] (NaN when no position is marked)."""
    from alter.model import alter_layers
    from alter_kernels import route

    config = model.alter_config
    shares: list[torch.Tensor] = []

    def hook(router, inputs, logits):
        weights, experts = route(logits, inputs[1], config.entropy_threshold, config.tau_high, config.tau_low,
                                 config.k_high, config.k_low, backend=config.backend)
        shares.append((weights * (experts > RETENTION_EXPERT)).sum(-1).float())

    handles = [layer.router.register_forward_hook(hook) for layer in alter_layers(model).values()]
    total = count = 0.0
    try:
        with evaluating(model):
            for _, batch in batches(examples, pad_id, batch_size, next(model.parameters()).device):
                shares.clear()
                with precomputed_entropy(model, batch["entropy"]):
                    model(**_model_inputs(batch))
                mask = (batch["route_mask"].bool() & batch["attention_mask"].bool()).reshape(-1)
                per_token = torch.stack(shares).mean(0)
                total += float(per_token[mask].sum())
                count += float(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return total / count if count else float("nan")


# ------------------------------------------------------------------------ the loop


def _autocast_factory(device: torch.device, mixed_precision: bool):
    if mixed_precision:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _checkpointing_on(model) -> bool:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing on (non-reentrant: the adapters' frozen base needs no
    input gradients) or off."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Checkpointer:
    """Writes and reads ``output_dir/checkpoint.pt``: trainable parameters, optimizer,
    step, RNG state, and a fingerprint of the run so that a resume with other settings
    fails loudly instead of mixing two runs."""

    def __init__(self, output_dir: str | None, fingerprint: dict):
        self.path = None if output_dir is None else os.path.join(output_dir, CHECKPOINT_FILE)
        self.fingerprint = fingerprint

    def save(self, step: int, params: dict, optimizer, write: bool = True) -> None:
        """Save ``params`` (full tensors) and the optimizer; only where ``write`` (the
        main process of a distributed run)."""
        if not write:
            return
        state = {
            "step": step,
            "fingerprint": self.fingerprint,
            "params": {name: p.detach().cpu() for name, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
        }
        # staged and renamed: a run killed mid-write keeps the previous checkpoint
        with staged_directory(os.path.dirname(self.path)) as staging:
            torch.save(state, os.path.join(staging, CHECKPOINT_FILE))

    def read(self) -> dict | None:
        """The checkpoint's state (None when there is none), after checking that this run
        wrote it: a resume with other settings or data fails loudly instead of mixing two
        runs, and an unreadable file is a ValueError."""
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike: the file is damaged
            raise ValueError(f"cannot resume: {self.path} is not a readable checkpoint ({first_line(exc)})") from exc
        keys = ("step", "fingerprint", "params", "optimizer", "rng")
        if not isinstance(state, dict) or any(key not in state for key in keys) or not isinstance(state["fingerprint"], dict):
            raise ValueError(f"cannot resume: {self.path} is not a checkpoint of alter.train (it lacks {list(keys)})")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cannot resume from {self.path}: it was written by a different run "
                f"({_differences(state['fingerprint'], self.fingerprint)}); start again without resume"
            )
        return state

    def restore(self, state: dict, model, names: list[str], optimizer) -> int:
        """Copy a :meth:`read` state into the named parameters of ``model``, the optimizer and
        RNG (before an engine wraps them); returns its step."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        return state["step"]


def _full_state(model, names: list[str], engine) -> dict:
    """The named parameters of ``model`` as full tensors (gathered when sharded)."""
    if engine is None:
        params = dict(model.named_parameters())
        return {name: params[name] for name in names}
    return engine.full_state(model, names)


def _differences(saved: dict, current: dict, prefix: str = "") -> str:
    """``key: saved -> current`` for each differing key of two run fingerprints."""
    parts = []
    for key in sorted(set(saved) | set(current), key=str):
        have, want = saved.get(key), current.get(key)
        if isinstance(have, dict) and isinstance(want, dict):
            parts += [_differences(have, want, f"{prefix}{key}.")] if have != want else []
        elif have != want:
            parts.append(f"{prefix}{key}: {have!r} -> {want!r}")
    return ", ".join(parts)


def run_length(n_forget: int, batch_size: int, epochs: int | None, router_warmup: int | None,
               adapter: bool) -> tuple[int, int]:
    """(router warm-up steps, unlearning steps) of a run (module doc, "Run length")."""
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
    """:class:`LabelScores` of ``model`` on ``examples`` (eval mode, no gradients)."""
    total = 0.0
    predicted = []
    with evaluating(model):
        for _, batch in batches(examples, pad_id, batch_size, next(model.parameters()).device):
            if "entropy" in batch and is_patched(model):
                with precomputed_entropy(model, batch["entropy"]):
                    logits = model(**_model_inputs(batch)).logits
            else:
                logits = model(**_model_inputs(batch)).logits
            flat_logits, flat_labels = _shift(logits, batch["labels"])
            keep = flat_labels != IGNORE_INDEX
            labelled, labels = flat_logits[keep].float(), flat_labels[keep]
            total += float(torch.log_softmax(labelled, -1).gather(-1, labels[:, None]).exp().sum())
            predicted.append((labelled.argmax(-1) == labels).cpu())
    predicted = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.bool)
    return LabelScores(total / max(len(predicted), 1), predicted)


@dataclass
class UnlearnReport:
    """What an :func:`unlearn` run did (``model.unlearn_report``).

    ``steps``: optimizer steps run in this call (``router_warmup`` of them router-only);
    ``losses``: per loss name (forget, retain, route, ...) its ``first``/``last``/``min``
    over the steps that logged it; ``forget_routing_share``: the share of the routing
    weight that the trained routers, gating on their own, give the forget experts on the
    forget positions that teach them (module doc, "Routing targets"), and
    ``retain_leak_share`` the same on every retained token (None for methods without
    forget experts); ``forget_probability_before/after``: the mean probability of the
    forget set's labelled tokens; ``forget_kept_share``: the share of the forget tokens the
    model predicted (argmax) at the start that it still predicts, weighted by
    :func:`bigram_surprisal`, at the end and, in
    ``forget_kept_history``, as ``(step, share)`` at each early-stop check;
    ``stopped_early``: whether the run stopped there (module doc, "Run length");
    ``seconds``: wall time.
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
    """The run's :class:`UnlearnReport`; ``forget_end``: the early stop's scores of the
    forget set when the run stopped early (the model has not changed since), else None."""
    losses: dict[str, dict] = {}
    for logs in history:
        for name, value in logs.items():
            entry = losses.setdefault(name, {"first": value, "last": value, "min": value})
            entry["last"], entry["min"] = value, min(entry["min"], value)
    shares = (None, None)
    if method in ("alter", "asym_lora"):
        shares = (routing_shares(model, forget_examples, pad_id, batch_size),
                  routing_shares(model, retain_examples, pad_id, batch_size))
    warmup_run = max(0, min(router_warmup, start_step + len(history)) - start_step)
    stopped_early = forget_end is not None
    if forget_end is None:
        forget_end = label_scores(model, forget_examples, pad_id, batch_size)
    return UnlearnReport(method, len(history), warmup_run, losses, *shares, forget_start.probability,
                         forget_end.probability, forget_end.kept_share(forget_start, fact_weight), kept_history,
                         stopped_early, seconds)


def unlearn(
    model,
    tokenizer,
    forget,
    retain=None,
    config: AlterConfig | None = None,
    method: str = "alter",
    *,
    epochs: int | None = None,
    batch_size: int = 4,
    lr: float = 1e-5,
    max_steps: int | None = None,
    max_length: int | None = None,
    structural: str = "surrogate",
    npo_beta: float = 0.1,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    output_dir: str | None = None,
    save_every: int | None = None,
    resume: bool = False,
    mixed_precision: bool | None = None,
    gradient_checkpointing: bool | None = None,
    router_warmup: int | None = None,
    router_lr: float | None = None,
    early_stop_share: float | None = DEFAULT_EARLY_STOP_SHARE,
    distributed: str | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
):
    """Unlearn ``forget`` from ``model`` while keeping ``retain``; returns the model.

    Args:
        model: a Hugging Face causal LM, trained in place: the adapter methods patch it
            with ``apply_alter``; the full-parameter baselines update its weights.
        tokenizer: its tokenizer.
        forget, retain: ``datasets.Dataset`` with ``question``/``answer`` columns or a
            ``text`` column. ``retain`` may be None for ``grad_ascent`` and ``npo``.
        config: ``AlterConfig`` of the adapter methods (rank, experts, entropy threshold,
            loss weights ``beta``/``gamma``/``lam``, ``lr_A``/``lr_B``, ...); default
            ``AlterConfig()``. The full-parameter baselines read ``beta`` and ``gamma``.
        method: one of ``METHODS``.
        epochs, batch_size: passes over the forget set, and samples per batch (each
            forget batch is paired with a retain batch of the same size). Default
            epochs: sized from the data (module doc, "Run length").
        lr: learning rate of the full-parameter baselines (AdamW, weight decay 0.01).
        max_steps: stop after this many optimizer steps (default: all epochs). The data
            order does not depend on it, so a run stopped early is a prefix of a full one.
        max_length: longest example allowed (default: the model's context); a longer one
            raises ``ValueError`` (it is not truncated silently).
        structural: ``"surrogate"`` (default) or ``"exact"`` (eq. 8 by double backward,
            eager backend; one backward per high-entropy token, so small models only).
        npo_beta: inverse temperature of NPO.
        max_grad_norm: gradient-norm clipping (None: off). The adapter methods clip the
            routers apart from A and B, so that large forget-loss gradients do not shrink
            the routing loss's.
        seed: seeds the adapter initialization, dropout, data order and k-means.
        output_dir: where checkpoints and the result go: the adapter (``save_adapter``
            format) or the model (``save_pretrained``), the tokenizer, ``unlearn_args.json``.
        save_every: write a checkpoint every this many steps (needs ``output_dir``).
        resume: continue from the checkpoint in ``output_dir`` if there is one.
        mixed_precision: bf16 autocast (default: on when the model is on a GPU).
        gradient_checkpointing: default on when the model is on a GPU.
        router_warmup: adapter methods: optimizer steps, before unlearning, that train
            only the routers, on the routing loss (B is still zero, so the model is the
            base model and the routers learn the sub-domain assignment on its features).
            Counted in ``max_steps``. Default: as many as the unlearning steps, at most
            ``MAX_ROUTER_WARMUP`` (0 for the full-parameter baselines).
        router_lr: adapter methods: learning rate of the routers (default ``config.lr_B``).
        early_stop_share: after each pass over the forget set (unlearning steps only),
            stop once at most this share of the forget tokens the model predicted at the
            start is still its prediction, each token weighted by its bigram surprisal
            (module doc, "Run length"); None: run every step.
        distributed: ``"ddp"`` or ``"fsdp2"`` to run on the processes of a launcher
            (``torchrun``), through ``accelerate``; under ``accelerate launch`` its config
            decides and None is fine. ``batch_size`` is the global batch, split over the
            processes, so any world size gives the single-process optimization
            (:mod:`alter.distributed`).
        progress: show a tqdm progress bar (main process).
        callback: ``callback(step, logs)`` after every optimizer step; ``logs`` holds
            the step's losses as floats.

    The model comes back in eval mode with ``model.unlearn_report``, an
    :class:`UnlearnReport` (steps, loss trajectories, routing shares, the forget tokens'
    probability before and after), printed unless ``progress=False``; a ``UserWarning``
    says when the forget set was barely forgotten, or when the run ended before the early
    stop's share was reached. An adapted model routes with its trained router
    (no forced route) and, unless ``config.entropy_source`` is ``"precomputed"``, gets
    its token entropy from ``"lagged"`` tracking: a prepass for whole sequences (as
    ``"prepass"`` does) and the lagged entropy for tokens decoded by ``model.generate``.
    """
    args = UnlearnArgs(method=method, config=config, seed=seed, batch_size=batch_size, lr=lr,
                       router_warmup=router_warmup, router_lr=router_lr, early_stop_share=early_stop_share,
                       structural=structural, npo_beta=npo_beta,
                       max_grad_norm=max_grad_norm, max_length=max_length, epochs=epochs, max_steps=max_steps,
                       output_dir=output_dir, save_every=save_every, resume=resume,
                       mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                       distributed=distributed)
    return _run(model, tokenizer, forget, retain, args, progress, callback)


def _run(model, tokenizer, forget, retain, args: UnlearnArgs, progress: bool, callback):
    """:func:`unlearn` with its arguments validated."""
    started = time.perf_counter()
    engine = None
    if args.distributed is not None or launched():
        engine = Engine(args.distributed, unused_parameters=method_class(args.method).adapter)
        if engine.mode == "fsdp2" and args.save_every is not None:  # refused before any work
            raise ValueError("save_every under fsdp2 is not supported yet (a checkpoint holds the full optimizer "
                             "state, which FSDP2 shards); checkpoint under ddp")
        model.to(engine.device)
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    autocast = _autocast_factory(device, on_gpu if args.mixed_precision is None else args.mixed_precision)
    method = build(args, autocast, engine)
    main = engine is None or engine.is_main
    if retain is None and method.needs_retain:
        raise ValueError(f"method {args.method!r} needs a retain set (retain is None)")
    batch_size, seed = args.batch_size, args.seed
    max_length = model_context_length(model) if args.max_length is None else args.max_length
    pad_id = pad_id_of(tokenizer)
    forget_examples = encode_dataset(tokenizer, forget, "forget", max_length)
    retain_examples = encode_dataset(tokenizer, retain, "retain", max_length) if retain is not None else []
    if engine is not None:
        engine.check_batches(batch_size, len(forget_examples))
    # What decides the result, for the resume check and the saved record.
    run = {**args.fingerprint(), "n_forget": len(forget_examples), "n_retain": len(retain_examples),
           "data_sha256": _examples_digest(forget_examples, retain_examples)}
    checkpointer = _Checkpointer(args.output_dir, run)
    checkpoint = checkpointer.read() if args.resume else None  # refuse another run before any forward
    progress = progress and main
    if progress:
        forget_tokens = sum(label != IGNORE_INDEX for example in forget_examples for label in example["labels"])
        print(f"unlearn [{args.method}]: targeting {len(forget_examples)} forget rows ({forget_tokens} labelled "
              f"tokens), keeping {len(retain_examples)} retain rows", flush=True)
    torch.manual_seed(seed)
    forget_start = label_scores(model, forget_examples, pad_id, batch_size)

    optimizer, forget_examples, retain_examples = method.setup(model, forget_examples, retain_examples, pad_id)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    start_step = checkpointer.restore(checkpoint, model, names, optimizer) if checkpoint is not None else 0
    wrapped = model
    if engine is not None:
        wrapped, optimizer = engine.prepare(model, optimizer)
        model = engine.unwrap(wrapped)
        method.attach(model)
    clip_groups = method.clip_groups(model)
    router_warmup, train_steps = run_length(len(forget_examples), batch_size, args.epochs, args.router_warmup,
                                            method.adapter)
    total_steps = router_warmup + train_steps
    total_steps = total_steps if args.max_steps is None else min(args.max_steps, total_steps)
    history: list[dict] = []
    kept_history: list[tuple[int, float]] = []
    stopped_at: LabelScores | None = None  # the forget set's scores where the early stop ended the run
    check_every = math.ceil(len(forget_examples) / batch_size)  # once per pass over the forget set
    fact_weight = bigram_surprisal(forget_examples, forget_examples + retain_examples)

    checkpointing = ((on_gpu if args.gradient_checkpointing is None else args.gradient_checkpointing)
                     and not _checkpointing_on(model))
    if checkpointing:
        _set_checkpointing(model, True)
    attention = getattr(model.config, "_attn_implementation", None)
    if args.structural == "exact" and attention not in (None, "eager"):
        # Fused attention kernels (SDPA, flash) have no double backward.
        model.set_attn_implementation("eager")
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"unlearn [{args.method}]", disable=not progress)
    for step in range(start_step, total_steps):
        forget_ids, retain_ids = _step_indices(step, len(forget_examples), len(retain_examples), batch_size, seed)
        if engine is not None:  # this process's share of the global batch
            forget_ids = engine.share(forget_ids)
            retain_ids = None if retain_ids is None else engine.share(retain_ids)
        forget_batch = _batch(forget_examples, forget_ids, pad_id, device)
        retain_batch = _batch(retain_examples, retain_ids, pad_id, device) if method.uses_retain else None
        optimizer.zero_grad(set_to_none=True)
        if step < router_warmup:
            logs = method.router_step(wrapped, forget_batch, retain_batch)
        else:
            logs = method.step(wrapped, forget_batch, retain_batch)
        if engine is not None:
            logs = engine.mean(logs)
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"unlearn: non-finite loss at step {step + 1}: {logs}")
        if args.max_grad_norm is not None:
            for params in clip_groups:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        history.append(logs)
        if callback is not None:
            callback(step + 1, logs)
        if args.save_every is not None and (step + 1) % args.save_every == 0:
            checkpointer.save(step + 1, _full_state(model, names, engine), optimizer, main)
        if args.early_stop_share is not None and step >= router_warmup \
                and (step + 1 - router_warmup) % check_every == 0 and step + 1 < total_steps:
            scores = label_scores(model, forget_examples, pad_id, batch_size)
            kept = scores.kept_share(forget_start, fact_weight)
            kept_history.append((step + 1, kept))
            if kept <= args.early_stop_share:
                stopped_at = scores
                break
    bar.close()
    if checkpointing:
        _set_checkpointing(model, False)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    model.eval()
    report = _report(model, args.method, forget_examples, retain_examples, pad_id, batch_size, history,
                     start_step, router_warmup, forget_start, fact_weight, kept_history, stopped_at,
                     time.perf_counter() - started)
    model.unlearn_report = report
    if progress:
        print(report)
    if main and report.forget_probability_after > FORGET_WARNING_RATIO * forget_start.probability:
        warnings.warn(f"unlearn [{args.method}]: the forget set is barely forgotten: its tokens' mean probability "
                      f"went {forget_start.probability:.3g} -> {report.forget_probability_after:.3g}; "
                      "train longer (epochs) or with larger learning rates", stacklevel=3)
    elif (main and args.early_stop_share is not None and args.max_steps is None and not report.stopped_early
          and report.forget_kept_share > args.early_stop_share):
        warnings.warn(f"unlearn [{args.method}]: the run ended after {report.steps} steps with "
                      f"{report.forget_kept_share:.2f} of the forget tokens still predicted (weighted), above "
                      f"early_stop_share {args.early_stop_share}: more epochs would forget more", stacklevel=3)
    state = engine.full_state_dict(model) if engine is not None and args.output_dir is not None else None
    if args.output_dir is not None and main:
        record = {**args.record(), **run, "router_warmup_steps": router_warmup, "steps": start_step + len(history),
                  "stopped_early": report.stopped_early}
        _save_result(model, tokenizer, args.output_dir, method, record, state)
    if engine is not None:
        engine.wait()
    return model


def _save_result(model, tokenizer, output_dir: str, method, args: dict, state: dict | None) -> None:
    """The adapter (or model), tokenizer and run record, written together: staged in a
    temporary sibling directory and moved in only when all are complete. ``state``: the
    model's full tensors when its own are shards."""
    with staged_directory(output_dir) as staging:
        method.save(model, staging, state)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, RUN_ARGS_FILE), "w") as f:
            json.dump(args, f, indent=2)


# ----------------------------------------------------------------- memorization


def finetune(
    model,
    tokenizer,
    data,
    *,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
):
    """Full-parameter next-token training on ``data`` (QA or text ``datasets.Dataset``).

    Used to build TOFU-style target and retain models (memorize the facts) before
    unlearning. AdamW with linear decay; returns the model in eval mode.
    """
    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    examples = encode_dataset(tokenizer, data, "data", model_context_length(model) if max_length is None else max_length)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)
    model.train()
    bar = tqdm(total=total, desc="finetune", disable=not progress)
    for step in range(total):
        epoch, j = divmod(step, steps_per_epoch)
        ids = _epoch_order(len(examples), seed, epoch)[j * batch_size : (j + 1) * batch_size]
        batch = _batch(examples, ids, pad_id, device)
        loss = token_nll(model(**_model_inputs(batch)).logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3g}")
        if callback is not None:
            callback(step + 1, {"loss": value})
    bar.close()
    model.eval()
    return model
