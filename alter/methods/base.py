"""What every unlearning method is: a loss over a forget and a retain batch,
``loss(model, forget, retain) -> (loss, logs)`` (open-unlearning's ``compute_loss``
shape), the things it declares it needs, and the parameterization it trains
(:mod:`alter.methods.params`: every weight, or AsymLoRA adapters).

A method is built from the run's ``alter.training.args.UnlearnArgs`` and an autocast
factory. :meth:`Method.setup` prepares the examples (:meth:`Method.prepare`: the fields
its loss reads, e.g. NPO's reference log-probabilities) and the parameters, and returns
the optimizer; :meth:`Method.step` runs one loss and its backward.

Under a distributed run each process gets its share of the global batch; the loss is
computed with the engine's wrapped model (``model``, for the forwards) while the routing
contexts act on the unwrapped one (``self.model``). Each term is a mean over the tokens
(or samples) of the process's batch; :meth:`Method.global_mean` rescales it so that the
engine's gradient averaging over processes gives the gradient of the mean over the global
batch (the single-process gradient).

:class:`RoutedMethod` is the AsymLoRA training protocol that ALTER and its ablations
share: cached base-model entropy, forget sub-domains, routing targets, and the forwards
under the routers' (or forced) routes.
"""
from __future__ import annotations

import dataclasses

import torch

from alter.adapters import forced_route, frozen_adapters, precomputed_entropy, router_loss
from alter.data import IGNORE_INDEX
from alter.methods.data import _model_inputs, base_model_pass, routing_targets, split_subdomains, with_fields
from alter.methods.losses import _floats, shift_labels, token_nll
from alter.methods.params import PARAMETERIZATIONS
from alter_kernels import inverted_hinge_loss
from alter_kernels.ihl import token_weights

RETENTION_EXPERT = 0


class Method:
    """One unlearning method. A subclass sets ``name``, declares what it needs and
    implements :meth:`loss` (and :meth:`prepare` when its loss reads per-example fields)."""

    name: str = ""
    params = "full"  # the parameterization it trains: a key of PARAMETERIZATIONS
    needs_retain = True  # False: the loss never reads a retain batch and retain may be None
    has_forget_experts = False  # adapters with forget experts apart from the retention expert

    def __init__(self, args, autocast, engine=None):
        # args: the run's alter.training.args.UnlearnArgs (a layer above the methods)
        self.args = args
        self.config = args.config
        self.autocast = autocast
        # engine: an alter.training.distributed.Engine (None: one process, plain autograd)
        self.reduce_sum = engine.reduce_sum if engine is not None and engine.world > 1 else None
        self.world = 1 if engine is None else engine.world
        self.backward = engine.backward if engine is not None else torch.Tensor.backward
        self.distributed = engine is not None
        self.parameters = PARAMETERIZATIONS[self.params](args)
        self.model = None

    @classmethod
    def routed(cls) -> bool:
        """Whether the method trains routers (and so has a router warm-up)."""
        return PARAMETERIZATIONS[cls.params].routed

    # ----------------------------------------------------------------- setup

    def setup(self, model, forget_examples: list[dict], retain_examples: list[dict], pad_id: int):
        """Prepare ``model`` and the examples (all processes alike). Returns the optimizer
        and the forget and retain examples to train on (new dicts with the method's
        per-example fields; the given ones stay as they are)."""
        forget_examples, retain_examples = self.prepare(model, forget_examples, retain_examples, pad_id)
        optimizer = self.parameters.setup(model, self.config)
        self.attach(model)
        return optimizer, forget_examples, retain_examples

    def prepare(self, model, forget_examples: list[dict], retain_examples: list[dict], pad_id: int):
        """The examples with the fields the loss reads (default: as given)."""
        return forget_examples, retain_examples

    def attach(self, model) -> None:
        """Read the parameters from ``model`` (the unwrapped model), again after an engine
        replaced them (FSDP2 makes them sharded tensors)."""
        self.model = model
        self.parameters.attach(model)

    def clip_groups(self, model) -> list[list[torch.nn.Parameter]]:
        return self.parameters.clip_groups(model)

    def save(self, model, directory: str, state: dict | None = None) -> None:
        self.parameters.save(model, directory, state)

    # ------------------------------------------------------------------ loss

    def global_mean(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``loss``, a mean over ``count`` local items, rescaled to the share of the mean over
        all processes' items whose gradient, averaged over processes, is that mean's."""
        if self.reduce_sum is None:
            return loss
        count = count.detach().float()
        total = self.reduce_sum(count.clone())
        return loss * (count * self.world / total.clamp_min(1))

    def logits(self, model, batch: dict) -> torch.Tensor:
        """The model's logits [B, L, V] for a batch."""
        with self.autocast():
            return model(**_model_inputs(batch)).logits

    def loss(self, model, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict]:
        """The step's loss (a scalar with gradient) and its terms to log (detached)."""
        raise NotImplementedError

    def step(self, model, forget: dict, retain: dict | None) -> dict:
        """Loss and backward of one unlearning step; returns the logged terms as floats."""
        loss, logs = self.loss(model, forget, retain)
        self.backward(loss)
        return _floats({**logs, "loss": loss.detach()})

    def warmup_step(self, model, forget: dict, retain: dict | None) -> dict:
        """A router warm-up step (methods with routers only)."""
        raise NotImplementedError(f"{self.name} has no router")


def labelled(labels: torch.Tensor) -> torch.Tensor:
    """Labelled next-token targets of a batch (the count ``token_nll`` averages over)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class RoutedMethod(Method):
    """The AsymLoRA training protocol (PEFT-like: the base weights stay frozen).

    :meth:`prepare` runs the base model once over the data: every token's entropy (cached
    for the run: the layers read it through ``precomputed_entropy``), the forget set's
    features, split by k-means into ``num_experts - 1`` sub-domains (each forget example's
    forget expert), and the routing targets. A subclass's loss combines
    :meth:`routed_logits` (the forwards that train A and B) with :meth:`routing_loss`
    (the forwards that train the routers only).
    """

    params = "asym_lora"
    has_forget_experts = True  # forget expert d for sub-domain d (False: every token to expert 0)

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        config, batch_size = self.config, self.args.batch_size
        features, forget_entropy = base_model_pass(model, forget_examples, pad_id, config.tsallis_q, batch_size)
        _, retain_entropy = base_model_pass(model, retain_examples, pad_id, config.tsallis_q, batch_size)
        if self.has_forget_experts:
            forget_experts = [int(d) + 1 for d in split_subdomains(features, config.num_experts - 1, self.args.seed)]
        else:
            forget_experts = [RETENTION_EXPERT] * len(forget_examples)
        forget_targets, retain_targets = routing_targets(forget_examples, retain_examples)
        forget_examples = with_fields(forget_examples, entropy=forget_entropy, expert=forget_experts,
                                      route_mask=forget_targets)
        retain_examples = with_fields(retain_examples, entropy=retain_entropy,
                                      expert=[RETENTION_EXPERT] * len(retain_examples), route_mask=retain_targets)
        self.config = dataclasses.replace(config, **self.config_changes(config))
        # Routing loss of each pass weighted by its set's share of the data (docs/training.md, "Routing targets").
        total = len(forget_examples) + len(retain_examples)
        self.route_weight = {True: 2 * len(forget_examples) / total, False: 2 * len(retain_examples) / total}
        # Experts trained under the routers' own gating (config.train_routes == "router"),
        # for the methods with forget experts; one adapter is always forced.
        self.router_routes = self.has_forget_experts and self.config.train_routes == "router"
        return forget_examples, retain_examples

    def config_changes(self, config) -> dict:
        """Changes to the user's config for this method's adapters."""
        if config.entropy_source == "prepass":
            return {"entropy_source": "lagged"}  # prepass on whole sequences, and generate() works
        return {}

    def routed_logits(self, model, batch: dict, forget: bool) -> torch.Tensor:
        """Logits of a forward that trains A and B: under the cached entropy, routed by the
        routers (``router_routes``) or forced to each example's expert. Under router routes
        a forget batch gives no gradient to the retention expert B_0: a forget token the
        router sends there must not teach it to forget."""
        frozen = [RETENTION_EXPERT] if forget and self.router_routes else []
        with forced_route(self.model, batch["expert"], gate=not self.router_routes), \
                precomputed_entropy(self.model, batch["entropy"]), frozen_adapters(self.model, frozen):
            return self.logits(model, batch)

    def routing_loss(self, model, forget: dict, retain: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The routers' loss on both batches, gating on their own as at inference, with
        gradients for the routers only (A and B frozen in these forwards). Under forced
        routes a router would learn to recognize the forget experts' own effect on the
        layers below it, which is absent at inference whenever those layers route
        differently. Returns (weighted loss, the unweighted sum to log)."""
        total, logged = 0.0, 0.0
        for batch, is_forget in ((forget, True), (retain, False)):
            with forced_route(self.model, batch["expert"], gate=False), \
                    precomputed_entropy(self.model, batch["entropy"]), frozen_adapters(self.model):
                logits = self.logits(model, batch)
            # The positions routing_targets chose (docs/training.md, "Routing targets").
            routed = batch["route_mask"].bool()
            route = router_loss(self.model, routed)
            count = (routed & batch["attention_mask"].bool()).sum()
            total = total + self.route_weight[is_forget] * self.global_mean(route, count)
            if self.distributed:
                # The routing loss reaches the routers through logits recorded aside; through
                # the model's output too, every parameter takes part in the backward (DDP
                # waits for each one) and FSDP2 gathers every unit before its backward.
                total = total + 0.0 * logits.sum()
            logged = logged + route.detach()
        return total, logged

    def ihl(self, logits, labels, high_entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(forget loss, the weight sum it is a mean over): the inverted hinge loss with
        high-entropy tokens weighted by ``high_entropy_weight`` (or ``config.forget_loss``
        ``"nll_ascent"``: ascent on the NLL)."""
        if self.config.forget_loss == "nll_ascent":
            return -token_nll(logits, labels), labelled(labels)
        flat_logits, flat_labels = shift_labels(logits, labels)
        loss, entropy = inverted_hinge_loss(
            flat_logits, flat_labels, self.config.tsallis_q, self.config.entropy_threshold,
            high_entropy_weight=high_entropy_weight, backend=self.config.backend,
        )
        if self.reduce_sum is None:
            return loss, None
        count = token_weights(entropy, flat_labels == IGNORE_INDEX, self.config.entropy_threshold, high_entropy_weight)
        return loss, count.sum()

    def warmup_step(self, model, forget: dict, retain: dict) -> dict:
        """The routing loss alone (a router warm-up step), gradients for the routers only."""
        loss, route = self.routing_loss(model, forget, retain)
        self.backward(loss)
        # A and B took part with zero gradient; no gradient at all keeps the optimizer from
        # counting warm-up steps for them (AdamW's bias correction starts at their first step).
        for param in self.parameters.A + self.parameters.B:
            param.grad = None
        return _floats({"route": route})
