"""Parameterizations: which weights a method's loss trains, how its forwards run, with
which optimizer, and what a run saves. A choice apart from the method's loss
(:mod:`alter.methods.base`): ``UnlearnArgs.params``, ``alter unlearn --params``.

``"full"``: every weight of the model (AdamW, weight decay 0.01, at ``args.lr``, sized
from the model when None: :func:`full_lr`); plain forwards; the result is the model
(``save_pretrained``).

``"asym_lora"``: the model patched with AsymLoRA adapters (``apply_alter``), the base
frozen; A at ``config.lr_A``, B at ``config.lr_B``, the routers at ``args.router_lr``
(default ``lr_B``); the result is the adapter (``save_adapter``). It brings the AsymLoRA
training protocol (docs/training.md): before training one no-grad pass of the base model
gives every token's entropy (cached for the run) and the forget set's features, split by
k-means into ``num_experts - 1`` sub-domains (each forget example's forget expert); the
method's forwards run under forced routes (or the routers' own, ``config.train_routes``);
the routers learn from a routing loss that this parameterization adds to every method's
loss (:meth:`AsymLoRAParameters.loss`), after a router warm-up.

``"lora"``: one plain LoRA adapter, realized as AsymLoRA with every token forced to
expert 0 and one expert kept per token (``k_high = k_low = 1``); the router learns to
pick expert 0 (so the saved adapter runs as one LoRA at inference). The same protocol
with no forget experts: the results of the former ``lora`` method are kept bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math

import torch

from alter.adapters import (adapter_parameters, apply_alter, disable_adapters, evaluating, forced_route,
                            frozen_adapters, precomputed_entropy, router_loss, save_adapter)
from alter.methods.data import base_model_pass, route_keys, routing_targets, split_subdomains, with_fields
from alter.methods.losses import _floats

RETENTION_EXPERT = 0
PARAMS = ("full", "lora", "asym_lora")
# Full-parameter learning rate sized from the model: LR_SCALE / sqrt(parameters), clipped
# to [LR_MIN, LR_MAX] (docs/training.md, "Full-parameter learning rate").
LR_SCALE, LR_MIN, LR_MAX = 0.1, 1e-5, 1e-3


def full_lr(model) -> float:
    """The default learning rate of ``params="full"`` for ``model``: ``LR_SCALE / sqrt(n)``
    for ``n`` parameters, clipped to ``[LR_MIN, LR_MAX]``: 1e-5, open-unlearning's rate for
    its 1-8B models, from 100M parameters up; 1e-4 at 1M, 2.4e-4 at 180k (the
    development scenarios' tiny Llamas, docs/training.md "Full-parameter learning rate")."""
    n = sum(p.numel() for p in model.parameters())
    return min(LR_MAX, max(LR_MIN, LR_SCALE / math.sqrt(n)))


class FullParameters:
    """Every weight trains with plain forwards; the result is the model."""

    name = "full"
    routed = False  # no routers: no router warm-up, no routing loss
    trains_routers = False  # set by prepare: a router warm-up and a routing loss (token routing)
    adapter = False  # True: the base stays frozen and the result is an adapter
    has_forget_experts = False  # adapters with forget experts apart from the retention expert

    def __init__(self, method):
        # method: the run's alter.methods.base.Method (its args, config, autocast, engine)
        self.method = method
        self.args = method.args
        self.lr = None  # the learning rate setup used

    # ----------------------------------------------------------------- setup

    def prepare(self, model, forget_examples: list[dict], retain_examples: list[dict], pad_id: int,
                tokenizer=None):
        """The examples with this parameterization's per-example fields, and the config
        changes its setup needs (default: none). ``tokenizer``: the examples' (or None)."""
        return forget_examples, retain_examples, {}

    def setup(self, model, config) -> torch.optim.Optimizer:
        self.lr = full_lr(model) if self.args.lr is None else self.args.lr
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)

    def attach(self, model) -> None:
        """Read the parameters from ``model``, again after an engine replaced them."""

    def clip_groups(self, model) -> list[list[torch.nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately."""
        return [[p for p in model.parameters() if p.requires_grad]]

    def save(self, model, directory: str, state: dict | None = None) -> None:
        """Write the result; ``state``: the model's full tensors when its own are shards."""
        model.save_pretrained(directory, state_dict=state)

    # ---------------------------------------------------------------- forwards

    def forward_context(self, batch: dict, forget: bool | None):
        """The context of a forward that trains (full: none)."""
        return contextlib.nullcontext()

    def reference_context(self, batch: dict):
        """The context of a no-grad forward of the starting model through the trained one
        (adapters only; under full the method keeps a frozen copy)."""
        raise NotImplementedError("params='full' has no starting model inside the trained one")

    def loss(self, model, forget: dict, retain: dict | None) -> tuple[torch.Tensor | float, dict]:
        """The parameterization's own term, added to every method's loss (full: none)."""
        return 0.0, {}

    def warmup_step(self, model, forget: dict, retain: dict) -> dict:
        raise NotImplementedError(f"params={self.name!r} has no router")


class AsymLoRAParameters(FullParameters):
    """AsymLoRA adapters on a frozen base, trained under the routing protocol; the result is
    the adapter."""

    name = "asym_lora"
    routed = True
    adapter = True
    has_forget_experts = True  # forget expert d for sub-domain d (False: every token to expert 0)

    def prepare(self, model, forget_examples, retain_examples, pad_id, tokenizer=None):
        """The base-model pass: cached entropy, forget experts (k-means sub-domains), and
        routing targets, as per-example fields ``entropy``, ``expert`` and ``route_mask``."""
        config, args = self.method.config, self.args
        features, forget_entropy = base_model_pass(model, forget_examples, pad_id, config.tsallis_q, args.batch_size)
        _, retain_entropy = base_model_pass(model, retain_examples, pad_id, config.tsallis_q, args.batch_size)
        if self.has_forget_experts:
            forget_experts = [int(d) + 1 for d in split_subdomains(features, config.num_experts - 1, args.seed)]
        else:
            forget_experts = [RETENTION_EXPERT] * len(forget_examples)
        forget_targets, retain_targets = routing_targets(forget_examples, retain_examples)
        forget_examples = with_fields(forget_examples, entropy=forget_entropy, expert=forget_experts,
                                      route_mask=forget_targets)
        retain_examples = with_fields(retain_examples, entropy=retain_entropy,
                                      expert=[RETENTION_EXPERT] * len(retain_examples), route_mask=retain_targets)
        # Routing loss of each pass weighted by its set's share of the data (docs/training.md, "Routing targets").
        total = len(forget_examples) + len(retain_examples)
        self.route_weight = {True: 2 * len(forget_examples) / total, False: 2 * len(retain_examples) / total}
        # Experts trained under the routers' own gating (config.train_routes == "router"),
        # with forget experts only; one adapter is always forced.
        self.router_routes = self.has_forget_experts and config.train_routes == "router"
        # prepass entropy runs on whole sequences; lagged tracking does that and lets generate() work.
        changes = {"entropy_source": "lagged"} if config.entropy_source == "prepass" else {}
        # Under the sequence route (routing None: the default where there are forget
        # experts) the keys gate every layer: no router to train.
        if config.routing == "sequence" and not self.has_forget_experts:
            raise ValueError(f"routing='sequence' routes to forget experts; params={self.name!r} has none "
                             "(use params='asym_lora')")
        sequence = config.routing in ("sequence", None) and self.has_forget_experts
        self.trains_routers = not sequence
        changes["routing"] = "sequence" if sequence else "token"
        if sequence:
            if args.router_warmup:
                raise ValueError("router_warmup trains the routers, which routing='sequence' does not use")
            changes["route_keys"] = route_keys(forget_examples, retain_examples, forget_experts, tokenizer)
        return forget_examples, retain_examples, changes

    def setup(self, model, config) -> torch.optim.Optimizer:
        apply_alter(model, config)
        groups = adapter_parameters(model)
        param_groups = [{"params": groups["A"], "lr": config.lr_A}, {"params": groups["B"], "lr": config.lr_B}]
        if self.trains_routers:
            router_lr = config.lr_B if self.args.router_lr is None else self.args.router_lr
            param_groups.append({"params": groups["router"], "lr": router_lr})
        else:  # the sequence route gates: the routers stay as they are
            for param in groups["router"]:
                param.requires_grad_(False)
        return torch.optim.AdamW(param_groups, weight_decay=0.0)

    def attach(self, model) -> None:
        self.model = model
        groups = adapter_parameters(model)
        self.A, self.B = groups["A"], groups["B"]
        # The routing passes' logits go unread: on one process they skip the output layer
        # (most of a tiny model's step is the vocabulary projection of its four forwards)
        # when the model takes logits_to_keep.
        skip_head = not self.method.distributed and "logits_to_keep" in inspect.signature(model.forward).parameters
        self.routing_pass_kwargs = {"logits_to_keep": 1} if skip_head else {}

    def clip_groups(self, model):
        # The routers apart from A and B, so that large forget-loss gradients do not
        # shrink the routing loss's.
        groups = adapter_parameters(model)
        return [groups["A"] + groups["B"], groups["router"]] if self.trains_routers else [groups["A"] + groups["B"]]

    def save(self, model, directory: str, state: dict | None = None) -> None:
        save_adapter(model, directory, state)

    @contextlib.contextmanager
    def forward_context(self, batch, forget):
        """A forward that trains A and B: under the cached entropy, routed by the routers
        (``router_routes``) or forced to each example's expert. Under router routes a
        forget batch gives no gradient to the retention expert B_0: a forget token the
        router sends there must not teach it to forget."""
        if forget is None:
            raise ValueError(f"params={self.name!r}: say whether the batch is the forget batch "
                             "(logits(model, batch, forget=True/False))")
        frozen = [RETENTION_EXPERT] if forget and self.router_routes else []
        # Under router routes the forced experts are only the routing loss's targets: with no
        # router to train (the sequence route), the layers need not record their logits.
        targets_only = self.router_routes and not self.trains_routers
        route = contextlib.nullcontext() if targets_only else forced_route(self.model, batch["expert"],
                                                                             gate=not self.router_routes)
        with route, precomputed_entropy(self.model, batch["entropy"]), frozen_adapters(self.model, frozen):
            yield

    @contextlib.contextmanager
    def reference_context(self, batch):
        # The cached entropy: no entropy prepass for a forward the adapters take no part in.
        with evaluating(self.model), disable_adapters(self.model), precomputed_entropy(self.model, batch["entropy"]):
            yield

    def loss(self, model, forget, retain):
        """The routers' loss on both batches, gating on their own as at inference, with
        gradients for the routers only (A and B frozen in these forwards). Under forced
        routes a router would learn to recognize the forget experts' own effect on the
        layers below it, which is absent at inference whenever those layers route
        differently. Returns (weighted loss, {"route": the unweighted sum}); (0, {}) under
        the sequence route, which trains no router."""
        if not self.trains_routers:
            return 0.0, {}
        method = self.method
        total, logged = 0.0, 0.0
        for batch, is_forget in ((forget, True), (retain, False)):
            with forced_route(self.model, batch["expert"], gate=False), \
                    precomputed_entropy(self.model, batch["entropy"]), frozen_adapters(self.model):
                with method.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   **self.routing_pass_kwargs).logits
            # The positions routing_targets chose (docs/training.md, "Routing targets").
            routed = batch["route_mask"].bool()
            route = router_loss(self.model, routed)
            count = (routed & batch["attention_mask"].bool()).sum()
            total = total + self.route_weight[is_forget] * method.global_mean(route, count)
            if method.distributed:
                # The routing loss reaches the routers through logits recorded aside; through
                # the model's output too, every parameter takes part in the backward (DDP
                # waits for each one) and FSDP2 gathers every unit before its backward.
                total = total + 0.0 * logits.sum()
            logged = logged + route.detach()
        return total, {"route": logged}

    def warmup_step(self, model, forget, retain) -> dict:
        """The routing loss alone (a router warm-up step), gradients for the routers only."""
        loss, logs = self.loss(model, forget, retain)
        self.method.backward(loss)
        # A and B took part with zero gradient; no gradient at all keeps the optimizer from
        # counting warm-up steps for them (AdamW's bias correction starts at their first step).
        for param in self.A + self.B:
            param.grad = None
        return _floats(logs)


class LoRAParameters(AsymLoRAParameters):
    """One LoRA adapter: AsymLoRA with every token forced to expert 0, one expert kept per
    token (the router learns that it is expert 0)."""

    name = "lora"
    has_forget_experts = False

    def prepare(self, model, forget_examples, retain_examples, pad_id, tokenizer=None):
        forget_examples, retain_examples, changes = super().prepare(model, forget_examples, retain_examples, pad_id,
                                                                    tokenizer)
        return forget_examples, retain_examples, {**changes, "k_high": 1, "k_low": 1}


PARAMETERIZATIONS = {"full": FullParameters, "lora": LoRAParameters, "asym_lora": AsymLoRAParameters}


def frozen_copy(model):
    """A no-grad copy of ``model`` in eval mode: the starting model of a full-parameter run
    whose loss reads it (``Method.needs_reference``)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference

