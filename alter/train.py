"""Unlearning: the ALTER trainer and the baselines, in one harness.

:func:`unlearn` takes a causal LM, its tokenizer, a forget set and a retain set
(``datasets.Dataset`` with ``question``/``answer`` columns, as TOFU, or a ``text`` column,
as WMDP/MUSE corpora) and returns the unlearned model. Methods:

``"alter"``
    The paper's method. Before training, one no-grad pass of the base model gives every
    token's Tsallis entropy (cached for the whole run: the paper observes that token
    entropy is stable under fine-tuning, so the layers read it through
    ``precomputed_entropy``) and the forget set's features (mean-pooled last hidden
    states), which k-means splits into ``num_experts - 1`` sub-domains: the routing
    target of a forget sample of sub-domain d is forget expert d, of a retained sample the
    retention expert 0. Each step minimizes ``beta * IHL(forget, low-entropy tokens) +
    gamma * NLL(retain) + lam * structural + routing loss``. A (at ``lr_A``) learns only
    from high-entropy tokens; B learns at ``lr_B``, the routers at ``router_lr`` (default
    ``lr_B``). After training the router gates on its own (no forced route).

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

    *Run length.* Without ``epochs``, a run has ``max(1 epoch, MIN_STEPS,
    min(DEFAULT_EPOCHS epochs, MAX_DEFAULT_STEPS))`` unlearning steps (a 10-row forget set
    gets 100 steps, not the ~8 of 3 epochs), preceded by a router warm-up of as many
    router-only steps, at most ``MAX_ROUTER_WARMUP``.
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
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from tqdm.auto import tqdm

from alter.config import AlterConfig
from alter.data import IGNORE_INDEX, collate, encode_qa, encode_text
from alter.files import first_line, staged_directory
from alter.model import (
    adapter_parameters,
    apply_alter,
    forced_route,
    is_patched,
    precomputed_entropy,
    router_loss,
    save_adapter,
)
from alter_kernels import inverted_hinge_loss, tsallis_entropy

METHODS = ("alter", "asym_lora", "lora", "grad_ascent", "grad_diff", "npo")
ADAPTER_METHODS = ("alter", "asym_lora", "lora")
STRUCTURAL_MODES = ("surrogate", "exact")
CHECKPOINT_FILE = "checkpoint.pt"
RUN_ARGS_FILE = "unlearn_args.json"
RETENTION_EXPERT = 0
# Run sizing when ``epochs`` / ``router_warmup`` are not given (module doc, "Run length").
DEFAULT_EPOCHS = 10
MIN_STEPS = 100
MAX_DEFAULT_STEPS = 400
MAX_ROUTER_WARMUP = 200
# The run report warns when the forget tokens' mean probability kept more than this
# fraction of its starting value.
FORGET_WARNING_RATIO = 0.9


# ----------------------------------------------------------------------------- data


def check_dataset(data, name: str) -> list[str]:
    """Raise a clear error unless ``data`` is a non-empty ``datasets.Dataset`` of usable
    QA or text rows (see :func:`check_rows`); returns each row's kind."""
    import datasets

    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty: unlearning needs at least one example")
    columns = set(data.column_names)
    if not ({"question", "answer"} <= columns or "text" in columns):
        raise ValueError(
            f"{name} needs 'question' and 'answer' columns (QA) or a 'text' column "
            f"(corpus); it has {sorted(columns)}"
        )
    return check_rows(data, name)


def check_rows(rows, name: str) -> list[str]:
    """The kind of each row of a forget or retain set: ``"qa"`` or ``"text"``.

    ``rows``: an iterable of dicts (a ``datasets.Dataset`` or parsed JSON rows). A row
    with a ``question`` or an ``answer`` (not None) is a QA row and needs both, else a
    row with a ``text`` is a text row; a set may mix the two (a table built from mixed
    rows holds None in the other kind's columns). A field in use must be a string with
    more than whitespace. Anything else raises ValueError naming the split, the row index
    and the field, because such a row would otherwise be trained on as ``"Question:
    None"`` with only EOS labelled, i.e. never unlearned.
    """
    kinds = []
    for i, row in enumerate(rows):
        where = f"{name}[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object with question/answer or text, got {type(row).__name__}")
        if row.get("question") is not None or row.get("answer") is not None:
            kinds.append("qa")
            fields = ("question", "answer")
        elif row.get("text") is not None:
            kinds.append("text")
            fields = ("text",)
        else:
            shown = {k: v for k, v in row.items() if v is not None} or "no non-null field"
            raise ValueError(f"{where}: needs 'question' and 'answer' (QA) or 'text' (corpus); it has {shown}")
        for field in fields:
            value = row.get(field)
            if value is None:
                raise ValueError(f"{where}: {field!r} is missing (a QA row needs a question and an answer)")
            if not isinstance(value, str):
                raise ValueError(f"{where}: {field!r} must be a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise ValueError(f"{where}: {field!r} is empty")
    return kinds


def model_context_length(model) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings``), if known."""
    return getattr(model.config, "max_position_embeddings", None)


def encode_dataset(tokenizer, data, name: str, max_length: int | None) -> list[dict]:
    """Tokenize a QA or text dataset into examples for :func:`alter.data.collate`.

    Each example holds ``input_ids``, ``attention_mask``, ``labels`` (int lists; QA rows
    are labelled on the answer only, text rows on every token). A row that is not a
    usable QA or text row (:func:`check_rows`) raises ``ValueError``, and so does an
    example longer than ``max_length``, naming the split and row, because truncating it
    would silently drop what should be forgotten or kept.
    """
    kinds = check_dataset(data, name)
    examples = []
    for i, (row, kind) in enumerate(zip(data, kinds)):
        try:
            if kind == "qa":
                example = encode_qa(tokenizer, row["question"], row["answer"], max_length)
            else:
                example = encode_text(tokenizer, row["text"], max_length)
        except ValueError as exc:
            raise ValueError(f"{name}[{i}]: {exc} (max_length defaults to the model's context)") from exc
        examples.append(example)
    return examples


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _batch(examples: list[dict], indices, pad_id: int, device) -> dict:
    """Collate ``examples[indices]`` (right padding) onto ``device``. Per-token fields
    other than ids and labels (the cached ``entropy``) pad with 0."""
    batch = collate([examples[int(i)] for i in indices], pad_id)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# ------------------------------------------------------------------ base-model pass


@torch.no_grad()
def base_model_pass(model, examples: list[dict], pad_id: int, q: float, batch_size: int) -> np.ndarray:
    """Store each token's entropy under the model in ``examples`` and return features.

    Sets ``example["entropy"]``: float32 ``[len]``, the Tsallis entropy of the model's
    next-token distribution at each position. Returns float64 ``[n, hidden]``: the
    mean-pooled last hidden state of each example (the k-means features). Run it on the
    base model (before patching).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = _batch(chunk, range(len(chunk)), pad_id, device)
        out = model(**_model_inputs(batch), output_hidden_states=True)
        entropy = tsallis_entropy(out.logits, q).float().cpu()
        for row, example in enumerate(chunk):
            example["entropy"] = entropy[row, : len(example["input_ids"])].clone()
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float64)
        hidden = out.hidden_states[-1].to(torch.float64)
        features.append(((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy())
    model.train(was_training)
    return np.concatenate(features)


def split_subdomains(features: np.ndarray, num_domains: int, seed: int = 0) -> np.ndarray:
    """k-means split of ``features [n, D]`` into ``num_domains`` sub-domains.

    Returns int64 labels ``[n]`` in ``0..num_domains-1``, the same for the same seed
    (``scipy.cluster.vq.kmeans2`` with k-means++ initialization). With no more distinct
    samples than domains, each distinct sample is its own sub-domain.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [n, D] array, got shape {features.shape}")
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    if num_domains == 1:
        return np.zeros(features.shape[0], dtype=np.int64)
    distinct, inverse = np.unique(features, axis=0, return_inverse=True)
    if len(distinct) <= num_domains:
        return inverse.reshape(-1).astype(np.int64)  # each distinct sample its own sub-domain
    _, labels = kmeans2(features, num_domains, minit="++", missing="warn", rng=np.random.default_rng(seed))
    return labels.astype(np.int64)


def _prefix_trie(examples: list[dict]) -> dict:
    """The token-prefix trie of ``examples``: ``{(node, token): child}``, root node 0."""
    trie: dict = {}
    for example in examples:
        node = 0
        for token in example["input_ids"]:
            node = trie.setdefault((node, token), len(trie) + 1)
    return trie


def mark_routing_targets(forget_examples: list[dict], retain_examples: list[dict]) -> None:
    """Set ``example["route_mask"]`` (int ``[len]``): the positions that teach the router.

    A forget position teaches the router its forget expert iff its context (the tokens up
    to and including it) is the prefix of no retained example: before that point the
    context cannot tell the forget example from a retained one (a shared BOS, question
    template or sentence opening), and a per-token router would only learn the mix of the
    two. Every retained position teaches the retention expert.
    """
    trie = _prefix_trie(retain_examples)
    for example in forget_examples:
        node, mask = 0, []
        for token in example["input_ids"]:
            node = trie.get((node, token), -1) if node >= 0 else -1
            mask.append(int(node < 0))
        example["route_mask"] = mask
    for example in retain_examples:
        example["route_mask"] = [1] * len(example["input_ids"])


@torch.no_grad()
def routing_shares(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Share of the routing weight that the model's routers, gating on their own (as at
    inference, base-model entropy from ``example["entropy"]``), give the forget experts
    (1..N-1) on the positions ``example["route_mask"]`` marks, averaged over layers and
    positions. A float in [0, 1] (NaN when no position is marked)."""
    from alter.model import alter_layers
    from alter_kernels import route

    config = model.alter_config
    device = next(model.parameters()).device
    shares: list[torch.Tensor] = []

    def hook(router, inputs, logits):
        weights, experts = route(logits, inputs[1], config.entropy_threshold, config.tau_high, config.tau_low,
                                 config.k_high, config.k_low, backend=config.backend)
        shares.append((weights * (experts > RETENTION_EXPERT)).sum(-1).float())

    handles = [layer.router.register_forward_hook(hook) for layer in alter_layers(model).values()]
    was_training = model.training
    model.eval()
    total = count = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = _batch(chunk, range(len(chunk)), pad_id, device)
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
        model.train(was_training)
    return total / count if count else float("nan")


# ---------------------------------------------------------------------------- losses


def _shift(logits: torch.Tensor, labels: torch.Tensor):
    """Logits at position t predict the label at t + 1: ``[B·L, V]`` and ``[B·L]``, the
    last position of each sample ignored. The labels move, not the logits, so that the
    logits stay a view (``logits[:, :-1]`` would copy all ``[T, V]`` of them)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens (``labels != -100``)."""
    flat_logits, flat_labels = _shift(logits, labels)
    return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities of the labelled tokens of each sample: ``[B]``."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(-1)


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al., 2024): ``-(2/beta) * mean log sigmoid(-beta * log(pi/pi_ref))``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob)).mean()


def _high_entropy_tokens(batch: dict, threshold: float) -> torch.Tensor:
    return (batch["entropy"] > threshold) & batch["attention_mask"].bool()


def structural_surrogate(logits, batch: dict, q: float, threshold: float, backend=None) -> torch.Tensor:
    """``E_H[(S_q^adapted - S_q^base)^2]`` over the high-entropy tokens H of the batch."""
    high = _high_entropy_tokens(batch, threshold)
    adapted = tsallis_entropy(logits, q, backend=backend)
    # A masked mean, not [high].mean(): no host sync, and 0 when H is empty.
    return ((adapted - batch["entropy"]) ** 2 * high).sum() / high.sum().clamp_min(1)


def structural_exact(logits, batch: dict, q: float, threshold: float, A_params) -> torch.Tensor:
    """``E_H[||grad_A S_q(x_t)||^2]`` (eq. 8): one double-backward per high-entropy token."""
    high = _high_entropy_tokens(batch, threshold)
    if not high.any():
        return logits.new_zeros((), dtype=torch.float32)
    adapted = tsallis_entropy(logits, q, backend="eager")
    positions = high.nonzero().tolist()
    total = 0.0
    for b, t in positions:
        grads = torch.autograd.grad(adapted[b, t], A_params, create_graph=True, allow_unused=True)
        total = total + sum((g.to(torch.promote_types(g.dtype, torch.float32)) ** 2).sum() for g in grads if g is not None)
    return total / len(positions)


# -------------------------------------------------------------------------- objectives


@dataclass
class _AdapterRecipe:
    """How one adapter method uses the shared AsymLoRA machinery."""

    forget_loss: str  # "ihl": entropy-weighted IHL, "ihl_uniform", "nll_ascent"
    forget_experts: str  # "subdomain": expert d for sub-domain d, "retention": expert 0
    entropy_guided: bool  # A from high-entropy tokens only, structural term on


_ADAPTER_RECIPES = {
    "alter": _AdapterRecipe("ihl", "subdomain", True),
    "asym_lora": _AdapterRecipe("ihl_uniform", "subdomain", False),
    "lora": _AdapterRecipe("nll_ascent", "retention", False),
}


class _AdapterObjective:
    """One step of an adapter method, under the cached base-model entropy, gradients
    accumulated: a forget pass and a retain pass under forced routes (the losses of A and
    B), then the same two batches with the routers gating on their own (the routing loss,
    for the routers only)."""

    uses_retain = True

    def __init__(self, model, config: AlterConfig, recipe: _AdapterRecipe, structural: str, autocast,
                 n_forget: int, n_retain: int):
        self.config = config
        self.recipe = recipe
        # Routing loss of each pass weighted by its set's share of the data (module doc).
        total = n_forget + n_retain
        self.route_weight = {True: 2 * n_forget / total, False: 2 * n_retain / total}
        # Experts trained under the routers' own gating (config.train_routes == "router"),
        # for the methods with forget experts; "lora" has one adapter, always forced.
        self.router_routes = recipe.forget_experts == "subdomain" and config.train_routes == "router"
        self.structural = structural if recipe.entropy_guided and config.lam > 0 else None
        self.autocast = autocast
        groups = adapter_parameters(model)
        self.A_params, self.B_params = groups["A"], groups["B"]

    def _forget_loss(self, logits, labels):
        if self.recipe.forget_loss == "nll_ascent" or self.config.forget_loss == "nll_ascent":
            return -token_nll(logits, labels)
        flat_logits, flat_labels = _shift(logits, labels)
        weight = self.config.high_entropy_weight if self.recipe.forget_loss == "ihl" else 1.0
        loss, _ = inverted_hinge_loss(
            flat_logits, flat_labels, self.config.tsallis_q, self.config.entropy_threshold,
            high_entropy_weight=weight, backend=self.config.backend,
        )
        return loss

    def _structural(self, logits, batch):
        cfg = self.config
        if self.structural == "exact":
            return structural_exact(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, self.A_params)
        return structural_surrogate(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, cfg.backend)

    def _routed_tokens(self, batch: dict, forget: bool):
        # The positions mark_routing_targets chose (module doc, "Routing targets").
        return batch["route_mask"].bool()

    def _routing_pass(self, model, batch: dict, forget: bool) -> torch.Tensor:
        """Routing loss of the routers gating on their own, as at inference, with gradients
        for the routers only. Under forced routes a router would learn to recognize the
        forget experts' own effect on the layers below it, which is absent at inference
        whenever those layers route differently."""
        adapters = self.A_params + self.B_params
        for param in adapters:
            param.requires_grad_(False)
        try:
            with forced_route(model, batch["expert"], gate=False), precomputed_entropy(model, batch["entropy"]):
                with self.autocast():
                    model(**_model_inputs(batch))
                route = router_loss(model, self._routed_tokens(batch, forget))
                (self.route_weight[forget] * route).backward()
        finally:
            for param in adapters:
                param.requires_grad_(True)
        return route.detach()

    def _pass(self, model, batch: dict, forget: bool) -> dict:
        cfg = self.config
        gate = not self.router_routes
        with forced_route(model, batch["expert"], gate=gate), precomputed_entropy(model, batch["entropy"]):
            with self.autocast():
                logits = model(**_model_inputs(batch)).logits
            if forget:
                main = self._forget_loss(logits, batch["labels"])
                loss = cfg.beta * main
            else:
                main = token_nll(logits, batch["labels"])
                loss = cfg.gamma * main
            logs = {"forget" if forget else "retain": main.detach()}
            if self.structural is not None:
                structure = self._structural(logits, batch)
                loss = loss + cfg.lam * structure
                logs["structural"] = structure.detach()
            # Backward inside the routing context: gradient checkpointing recomputes the
            # forward here and must see the same routes and entropy.
            loss.backward()
        if forget and self.router_routes:
            # The forget loss trains the forget experts only: a forget token the router
            # sends to the retention expert must not teach it to forget.
            for B in self.B_params:
                if B.grad is not None:
                    B.grad[RETENTION_EXPERT].zero_()
        logs["loss"] = loss.detach()
        return logs

    def step(self, model, forget: dict, retain: dict) -> dict:
        """Forward and backward of one unlearning step; returns its losses."""
        logs = self._pass(model, forget, True)
        for key, value in self._pass(model, retain, False).items():
            logs[key] = logs[key] + value if key in logs else value
        logs["route"] = self._route_losses(model, forget, retain)
        return _floats(logs)

    def router_step(self, model, forget: dict, retain: dict) -> dict:
        """The routing loss alone (a router warm-up step), gradients for the routers only."""
        return _floats({"route": self._route_losses(model, forget, retain)})

    def _route_losses(self, model, forget: dict, retain: dict) -> torch.Tensor:
        return self._routing_pass(model, forget, True) + self._routing_pass(model, retain, False)


class _FullParameterObjective:
    """One step of a full-parameter baseline (gradient ascent, GradDiff, NPO)."""

    def __init__(self, method: str, beta: float, gamma: float, npo_beta: float, autocast):
        self.method = method
        self.beta, self.gamma, self.npo_beta = beta, gamma, npo_beta
        self.autocast = autocast
        self.uses_retain = method == "grad_diff"

    def step(self, model, forget: dict, retain: dict | None) -> dict:
        """Forward and backward of one unlearning step; returns its losses."""
        with self.autocast():
            logits = model(**_model_inputs(forget)).logits
        if self.method == "npo":
            forget_loss = npo_loss(sequence_logprob(logits, forget["labels"]), forget["ref_logprob"], self.npo_beta)
        else:
            forget_loss = -token_nll(logits, forget["labels"])
        loss = self.beta * forget_loss
        logs = {"forget": forget_loss.detach()}
        if self.uses_retain:
            with self.autocast():
                retain_logits = model(**_model_inputs(retain)).logits
            retain_loss = token_nll(retain_logits, retain["labels"])
            loss = loss + self.gamma * retain_loss
            logs["retain"] = retain_loss.detach()
        loss.backward()
        logs["loss"] = loss.detach()
        return _floats(logs)


def _floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's scalar losses as floats, read with one device-to-host copy (each
    ``.item()`` would stall the host until the device drains its queue)."""
    values = torch.stack([value.float() for value in logs.values()]).tolist()
    return dict(zip(logs, values))


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

    def save(self, step: int, params: dict, optimizer) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        state = {
            "step": step,
            "fingerprint": self.fingerprint,
            "params": {name: p.detach().cpu() for name, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
        }
        tmp = self.path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a run killed mid-write keeps the previous checkpoint

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

    def restore(self, state: dict, params: dict, optimizer) -> int:
        """Copy a :meth:`read` state into the parameters, optimizer and RNG; returns its step."""
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        return state["step"]


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


def _examples_digest(*splits: list[dict]) -> str:
    """SHA-256 of the token ids and labels of encoded splits: what the run trains on."""
    digest = hashlib.sha256()
    for examples in splits:
        digest.update(json.dumps([[e["input_ids"], e["labels"]] for e in examples]).encode())
    return digest.hexdigest()


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def _step_indices(step: int, n_forget: int, n_retain: int, batch_size: int, seed: int):
    """Forget and retain example indices of global ``step``: a pure function of its
    arguments, so that a resumed run sees the same batches without replaying RNG."""
    per_epoch = math.ceil(n_forget / batch_size)
    epoch, j = divmod(step, per_epoch)
    forget_order = _epoch_order(n_forget, seed, 2 * epoch)
    forget_ids = forget_order[j * batch_size : (j + 1) * batch_size]
    retain_order = _epoch_order(n_retain, seed, 2 * epoch + 1)
    retain_ids = retain_order[(torch.arange(batch_size) + j * batch_size) % n_retain] if n_retain else None
    return forget_ids, retain_ids


def _check_positive(name: str, value, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


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


@torch.no_grad()
def mean_label_probability(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean probability the model gives the labelled tokens of ``examples`` (teacher forced)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = _batch(chunk, range(len(chunk)), pad_id, device)
        if "entropy" in batch and is_patched(model):
            with precomputed_entropy(model, batch["entropy"]):
                logits = model(**_model_inputs(batch)).logits
        else:
            logits = model(**_model_inputs(batch)).logits
        flat_logits, flat_labels = _shift(logits, batch["labels"])
        keep = flat_labels != IGNORE_INDEX
        logp = torch.log_softmax(flat_logits[keep].float(), -1).gather(-1, flat_labels[keep, None])
        total += float(logp.exp().sum())
        count += float(keep.sum())
    model.train(was_training)
    return total / max(count, 1.0)


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
    forget set's labelled tokens; ``seconds``: wall time.
    """

    method: str
    steps: int
    router_warmup: int
    losses: dict
    forget_routing_share: float | None
    retain_leak_share: float | None
    forget_probability_before: float
    forget_probability_after: float
    seconds: float

    def __str__(self) -> str:
        lines = [f"unlearn [{self.method}]: {self.steps} steps ({self.router_warmup} router warm-up) "
                 f"in {self.seconds:.1f} s"]
        for name, values in self.losses.items():
            lines.append(f"  {name:<10} first {values['first']:.4g}  last {values['last']:.4g}  min {values['min']:.4g}")
        lines.append(f"  forget-token probability {self.forget_probability_before:.3g} -> "
                     f"{self.forget_probability_after:.3g}")
        if self.forget_routing_share is not None:
            lines.append(f"  routing: forget tokens -> forget experts {self.forget_routing_share:.2f}, "
                         f"retained tokens leaking there {self.retain_leak_share:.2f}")
        return "\n".join(lines)


def _report(model, method, forget_examples, retain_examples, pad_id, batch_size, history, start_step,
            router_warmup, forget_prob_before, seconds) -> UnlearnReport:
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
    return UnlearnReport(method, len(history), warmup_run, losses, *shares,
                         forget_prob_before, mean_label_probability(model, forget_examples, pad_id, batch_size),
                         seconds)


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
        progress: show a tqdm progress bar.
        callback: ``callback(step, logs)`` after every optimizer step; ``logs`` holds
            the step's losses as floats.

    The model comes back in eval mode with ``model.unlearn_report``, an
    :class:`UnlearnReport` (steps, loss trajectories, routing shares, the forget tokens'
    probability before and after), printed unless ``progress=False``; a ``UserWarning``
    says when the forget set was barely forgotten. An adapted model routes with its trained router
    (no forced route) and, unless ``config.entropy_source`` is ``"precomputed"``, gets
    its token entropy from ``"lagged"`` tracking: a prepass for whole sequences (as
    ``"prepass"`` does) and the lagged entropy for tokens decoded by ``model.generate``.
    """
    config = _check_unlearn_args(config, method, retain, structural, epochs, batch_size, max_steps,
                                 save_every, output_dir, resume, router_warmup, router_lr)
    started = time.perf_counter()
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    autocast = _autocast_factory(device, on_gpu if mixed_precision is None else mixed_precision)
    # What decides the result, for the resume check and the saved record (max_length as
    # given: the model's context when None).
    run = {"method": method, "seed": seed, "batch_size": batch_size, "lr": lr, "router_warmup": router_warmup,
           "router_lr": router_lr, "structural": structural, "npo_beta": npo_beta, "max_grad_norm": max_grad_norm,
           "max_length": max_length, "config": config.to_dict()}
    max_length = model_context_length(model) if max_length is None else max_length
    pad_id = _pad_id(tokenizer)
    forget_examples = encode_dataset(tokenizer, forget, "forget", max_length)
    retain_examples = encode_dataset(tokenizer, retain, "retain", max_length) if retain is not None else []
    run.update(n_forget=len(forget_examples), n_retain=len(retain_examples),
               data_sha256=_examples_digest(forget_examples, retain_examples))
    checkpointer = _Checkpointer(output_dir, run)
    checkpoint = checkpointer.read() if resume else None  # refuse another run before any forward
    if progress:
        forget_tokens = sum(label != IGNORE_INDEX for example in forget_examples for label in example["labels"])
        print(f"unlearn [{method}]: targeting {len(forget_examples)} forget rows ({forget_tokens} labelled tokens), "
              f"keeping {len(retain_examples)} retain rows", flush=True)
    torch.manual_seed(seed)
    forget_prob_before = mean_label_probability(model, forget_examples, pad_id, batch_size)

    if method in ADAPTER_METHODS:
        optimizer, objective = _setup_adapter_method(
            model, config, method, forget_examples, retain_examples, pad_id, batch_size, structural, seed, autocast,
            router_lr)
    else:
        if method == "npo":
            _store_reference_logprob(model, forget_examples, pad_id, batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        objective = _FullParameterObjective(method, config.beta, config.gamma, npo_beta, autocast)

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if method in ADAPTER_METHODS:
        groups = adapter_parameters(model)
        clip_groups = [groups["A"] + groups["B"], groups["router"]]
    else:
        clip_groups = [list(trainable.values())]
    router_warmup, train_steps = run_length(len(forget_examples), batch_size, epochs, router_warmup,
                                            method in ADAPTER_METHODS)
    total_steps = router_warmup + train_steps
    total_steps = total_steps if max_steps is None else min(max_steps, total_steps)
    start_step = checkpointer.restore(checkpoint, trainable, optimizer) if checkpoint is not None else 0
    history: list[dict] = []

    checkpointing = (on_gpu if gradient_checkpointing is None else gradient_checkpointing) and not _checkpointing_on(model)
    if checkpointing:
        _set_checkpointing(model, True)
    attention = getattr(model.config, "_attn_implementation", None)
    if structural == "exact" and attention not in (None, "eager"):
        # Fused attention kernels (SDPA, flash) have no double backward.
        model.set_attn_implementation("eager")
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"unlearn [{method}]", disable=not progress)
    for step in range(start_step, total_steps):
        forget_ids, retain_ids = _step_indices(step, len(forget_examples), len(retain_examples), batch_size, seed)
        forget_batch = _batch(forget_examples, forget_ids, pad_id, device)
        retain_batch = _batch(retain_examples, retain_ids, pad_id, device) if objective.uses_retain else None
        optimizer.zero_grad(set_to_none=True)
        if step < router_warmup:
            logs = objective.router_step(model, forget_batch, retain_batch)
        else:
            logs = objective.step(model, forget_batch, retain_batch)
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"unlearn: non-finite loss at step {step + 1}: {logs}")
        if max_grad_norm is not None:
            for params in clip_groups:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        history.append(logs)
        if callback is not None:
            callback(step + 1, logs)
        if save_every is not None and (step + 1) % save_every == 0:
            checkpointer.save(step + 1, trainable, optimizer)
    bar.close()
    if checkpointing:
        _set_checkpointing(model, False)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    model.eval()
    model.unlearn_report = _report(model, method, forget_examples, retain_examples, pad_id, batch_size, history,
                                   start_step, router_warmup, forget_prob_before, time.perf_counter() - started)
    if progress:
        print(model.unlearn_report)
    if model.unlearn_report.forget_probability_after > FORGET_WARNING_RATIO * forget_prob_before:
        warnings.warn(f"unlearn [{method}]: the forget set is barely forgotten: its tokens' mean probability went "
                      f"{forget_prob_before:.3g} -> {model.unlearn_report.forget_probability_after:.3g}; "
                      "train longer (epochs) or with larger learning rates", stacklevel=2)
    if output_dir is not None:
        _save_result(model, tokenizer, output_dir, method,
                     {**run, "epochs": epochs, "router_warmup_steps": router_warmup, "steps": total_steps})
    return model


def _check_unlearn_args(config, method, retain, structural, epochs, batch_size, max_steps, save_every,
                        output_dir, resume, router_warmup, router_lr) -> AlterConfig:
    """Validate :func:`unlearn`'s arguments; returns the config to train with."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if config is None:
        config = AlterConfig()
    elif not isinstance(config, AlterConfig):
        raise TypeError(f"config must be an AlterConfig, got {type(config).__name__}")
    if structural not in STRUCTURAL_MODES:
        raise ValueError(f"structural must be one of {STRUCTURAL_MODES}, got {structural!r}")
    if structural == "exact":
        if config.backend not in (None, "eager"):
            raise ValueError(f"structural='exact' needs the eager backend, but config.backend is {config.backend!r}")
        config = dataclasses.replace(config, backend="eager")
    if epochs is not None:
        _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    if max_steps is not None:
        _check_positive("max_steps", max_steps)
    if save_every is not None:
        _check_positive("save_every", save_every)
        if output_dir is None:
            raise ValueError("save_every needs output_dir, where the checkpoints go")
    if resume and output_dir is None:
        raise ValueError("resume=True needs output_dir, where the checkpoint is")
    if router_warmup is not None and (not isinstance(router_warmup, int) or isinstance(router_warmup, bool)
                                      or router_warmup < 0):
        raise ValueError(f"router_warmup must be an int >= 0, got {router_warmup!r}")
    for name, value in (("router_warmup", router_warmup), ("router_lr", router_lr)):
        if value and method not in ADAPTER_METHODS:
            raise ValueError(f"{name} is for the adapter methods {ADAPTER_METHODS}; {method!r} has no router")
    if router_lr is not None and (isinstance(router_lr, bool) or not isinstance(router_lr, (int, float))
                                  or not router_lr > 0):
        raise ValueError(f"router_lr must be a positive number or None, got {router_lr!r}")
    if retain is None and method not in ("grad_ascent", "npo"):
        raise ValueError(f"method {method!r} needs a retain set (retain is None)")
    return config


def _setup_adapter_method(model, config, method, forget_examples, retain_examples, pad_id, batch_size,
                          structural, seed, autocast, router_lr):
    """Base-model pass (entropy cache, sub-domains), patching, optimizer and objective."""
    recipe = _ADAPTER_RECIPES[method]
    features = base_model_pass(model, forget_examples, pad_id, config.tsallis_q, batch_size)
    base_model_pass(model, retain_examples, pad_id, config.tsallis_q, batch_size)
    if recipe.forget_experts == "subdomain":
        subdomain = split_subdomains(features, config.num_experts - 1, seed)
        for example, domain in zip(forget_examples, subdomain):
            example["expert"] = int(domain) + 1
    else:
        for example in forget_examples:
            example["expert"] = RETENTION_EXPERT
    for example in retain_examples:
        example["expert"] = RETENTION_EXPERT
    mark_routing_targets(forget_examples, retain_examples)

    changes = {}
    if config.entropy_source == "prepass":
        changes["entropy_source"] = "lagged"  # prepass on whole sequences, and generate() works
    if not recipe.entropy_guided:
        changes["a_learns_from_high_entropy_only"] = False
    if method == "lora":
        # One adapter: each token keeps only its top expert, which the router learns is 0.
        changes.update(k_high=1, k_low=1)
    config = dataclasses.replace(config, **changes)
    apply_alter(model, config)
    groups = adapter_parameters(model)
    optimizer = torch.optim.AdamW(
        [{"params": groups["A"], "lr": config.lr_A}, {"params": groups["B"], "lr": config.lr_B},
         {"params": groups["router"], "lr": config.lr_B if router_lr is None else router_lr}],
        weight_decay=0.0,
    )
    objective = _AdapterObjective(model, config, recipe, structural, autocast, len(forget_examples), len(retain_examples))
    return optimizer, objective


def _save_result(model, tokenizer, output_dir: str, method: str, args: dict) -> None:
    """The adapter (or model), tokenizer and run record, written together: staged in a
    temporary sibling directory and moved in only when all are complete."""
    with staged_directory(output_dir) as staging:
        if method in ADAPTER_METHODS:
            save_adapter(model, staging)
        else:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, RUN_ARGS_FILE), "w") as f:
            json.dump(args, f, indent=2)


@torch.no_grad()
def _store_reference_logprob(model, examples: list[dict], pad_id: int, batch_size: int) -> None:
    """Set ``example["ref_logprob"]``: the sequence log-probability of the labelled tokens
    under the frozen starting model (NPO's reference), computed once."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = _batch(chunk, range(len(chunk)), pad_id, device)
        logprob = sequence_logprob(model(**_model_inputs(batch)).logits, batch["labels"]).cpu()
        for example, value in zip(chunk, logprob.tolist()):
            example["ref_logprob"] = value
    model.train(was_training)


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
    pad_id = _pad_id(tokenizer)
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
