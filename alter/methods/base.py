"""The two kinds of unlearning method, over which each method's module is a few lines.

A method is built from the run's :class:`~alter.training.args.UnlearnArgs` and an autocast
factory; :meth:`Method.setup` prepares the model and returns the optimizer and the
examples to train on (with the method's per-example fields); :meth:`Method.step` runs the forward and backward passes of one optimizer
step (``router_step`` those of a router warm-up step) and returns its losses.

Under a distributed run each process gets its share of the global batch; ``step`` is
called with the engine's wrapped model (``model``, for the forwards) while the routing
contexts act on the unwrapped one (``self.model``). Each loss is a mean over the tokens
(or samples) of the process's batch; :meth:`Method.global_mean` rescales it so that the
engine's gradient averaging over processes gives the gradient of the mean over the global
batch (the single-process gradient).
"""
from __future__ import annotations

import dataclasses

import torch

from alter.data import IGNORE_INDEX
from alter.methods.data import _model_inputs, base_model_pass, routing_targets, split_subdomains, with_fields
from alter.methods.losses import (_floats, _high_entropy_tokens, _shift, structural_exact, structural_surrogate,
                                  token_nll)
from alter.adapters import adapter_parameters, apply_alter, forced_route, precomputed_entropy, router_loss, save_adapter
from alter_kernels import inverted_hinge_loss
from alter_kernels.ihl import token_weights

RETENTION_EXPERT = 0


class Method:
    """One unlearning method. Subclasses set the class attributes and the losses."""

    name: str = ""
    adapter = False  # patches the model with AsymLoRA adapters (else trains every weight)
    needs_retain = True  # refuses retain=None
    uses_retain = True  # each step reads a retain batch

    def __init__(self, args, autocast, engine=None):
        # args: the run's alter.training.args.UnlearnArgs (a layer above the methods)
        self.args = args
        self.config = args.config
        self.autocast = autocast
        # engine: an alter.training.distributed.Engine (None: one process, plain autograd)
        self.reduce_sum = engine.reduce_sum if engine is not None and engine.world > 1 else None
        self.world = 1 if engine is None else engine.world
        self.backward = engine.backward if engine is not None else torch.Tensor.backward
        self.sharded = engine is not None and engine.mode == "fsdp2"
        self.model = None

    def setup(self, model, forget_examples: list[dict], retain_examples: list[dict], pad_id: int):
        """Prepare ``model`` (all processes alike). Returns the optimizer and the forget
        and retain examples to train on: new dicts, with the method's per-example fields
        added (the given ones stay as they are)."""
        raise NotImplementedError

    def attach(self, model) -> None:
        """Read the parameters from ``model`` (the unwrapped model), again after an engine
        replaced them (FSDP2 makes them sharded tensors)."""
        self.model = model

    def clip_groups(self, model) -> list[list[torch.nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately."""
        return [[p for p in model.parameters() if p.requires_grad]]

    def save(self, model, directory: str, state: dict | None = None) -> None:
        """Write the result; ``state``: the model's full tensors when its own are shards."""
        model.save_pretrained(directory, state_dict=state)

    def global_mean(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``loss``, a mean over ``count`` local items, rescaled to the share of the mean over
        all processes' items whose gradient, averaged over processes, is that mean's."""
        if self.reduce_sum is None:
            return loss
        count = count.detach().float()
        total = self.reduce_sum(count.clone())
        return loss * (count * self.world / total.clamp_min(1))

    def step(self, model, forget: dict, retain: dict | None) -> dict:
        raise NotImplementedError

    def router_step(self, model, forget: dict, retain: dict | None) -> dict:
        raise NotImplementedError(f"{self.name} has no router")


def _labelled(labels: torch.Tensor) -> torch.Tensor:
    """Labelled next-token targets of a batch (the count ``token_nll`` averages over)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class FullParameterMethod(Method):
    """A full-parameter baseline: AdamW on every weight, ``beta * forget + gamma * retain``."""

    def setup(self, model, forget_examples, retain_examples, pad_id):
        self.attach(model)
        return torch.optim.AdamW(model.parameters(), lr=self.args.lr, weight_decay=0.01), forget_examples, retain_examples

    def forget_loss(self, logits, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the count it is a mean over)."""
        return -token_nll(logits, batch["labels"]), _labelled(batch["labels"])

    def step(self, model, forget: dict, retain: dict | None) -> dict:
        """Forward and backward of one unlearning step; returns its losses."""
        cfg = self.config
        with self.autocast():
            logits = model(**_model_inputs(forget)).logits
        forget_loss, count = self.forget_loss(logits, forget)
        loss = cfg.beta * self.global_mean(forget_loss, count)
        logs = {"forget": forget_loss.detach()}
        if self.uses_retain:
            with self.autocast():
                retain_logits = model(**_model_inputs(retain)).logits
            retain_loss = token_nll(retain_logits, retain["labels"])
            loss = loss + cfg.gamma * self.global_mean(retain_loss, _labelled(retain["labels"]))
            logs["retain"] = retain_loss.detach()
        self.backward(loss)
        logs["loss"] = loss.detach()
        return _floats(logs)


class AdapterMethod(Method):
    """A method over the AsymLoRA adapters (PEFT-like: the base weights stay frozen).

    One step runs under the cached base-model entropy, gradients accumulated: a forget pass
    and a retain pass (the losses of A and B), then the same two batches with the routers
    gating on their own (the routing loss, for the routers only). Subclasses choose the
    forget experts, the forget loss, and whether the entropy guides A and the structural term.
    """

    adapter = True
    forget_experts = "subdomain"  # "subdomain": expert d for sub-domain d, "retention": expert 0
    # True: entropy-weighted IHL, the structural term, A as the config says; False: uniform
    # IHL, no structural term, A from every token.
    entropy_guided = False

    # ----------------------------------------------------------------- setup

    def setup(self, model, forget_examples, retain_examples, pad_id):
        """Base-model pass (entropy cache, sub-domains), patching, optimizer."""
        config, batch_size = self.config, self.args.batch_size
        features, forget_entropy = base_model_pass(model, forget_examples, pad_id, config.tsallis_q, batch_size)
        _, retain_entropy = base_model_pass(model, retain_examples, pad_id, config.tsallis_q, batch_size)
        if self.forget_experts == "subdomain":
            forget_experts = [int(d) + 1 for d in split_subdomains(features, config.num_experts - 1, self.args.seed)]
        else:
            forget_experts = [RETENTION_EXPERT] * len(forget_examples)
        forget_targets, retain_targets = routing_targets(forget_examples, retain_examples)
        forget_examples = with_fields(forget_examples, entropy=forget_entropy, expert=forget_experts,
                                      route_mask=forget_targets)
        retain_examples = with_fields(retain_examples, entropy=retain_entropy,
                                      expert=[RETENTION_EXPERT] * len(retain_examples), route_mask=retain_targets)

        config = dataclasses.replace(config, **self.config_changes(config))
        apply_alter(model, config)
        self.config = config
        self.attach(model)
        groups = adapter_parameters(model)
        router_lr = self.args.router_lr
        optimizer = torch.optim.AdamW(
            [{"params": groups["A"], "lr": config.lr_A}, {"params": groups["B"], "lr": config.lr_B},
             {"params": groups["router"], "lr": config.lr_B if router_lr is None else router_lr}],
            weight_decay=0.0,
        )
        # Routing loss of each pass weighted by its set's share of the data (docs/training.md, "Routing targets").
        total = len(forget_examples) + len(retain_examples)
        self.route_weight = {True: 2 * len(forget_examples) / total, False: 2 * len(retain_examples) / total}
        # Experts trained under the routers' own gating (config.train_routes == "router"),
        # for the methods with forget experts; "lora" has one adapter, always forced.
        self.router_routes = self.forget_experts == "subdomain" and config.train_routes == "router"
        self.structural = self.args.structural if self.entropy_guided and config.lam > 0 else None
        return optimizer, forget_examples, retain_examples

    def attach(self, model) -> None:
        self.model = model
        groups = adapter_parameters(model)
        self.A_params, self.B_params = groups["A"], groups["B"]

    def config_changes(self, config) -> dict:
        """Changes to the user's config for this method's adapters."""
        changes = {}
        if config.entropy_source == "prepass":
            changes["entropy_source"] = "lagged"  # prepass on whole sequences, and generate() works
        if not self.entropy_guided:
            changes["a_learns_from_high_entropy_only"] = False
        return changes

    def clip_groups(self, model):
        # The routers apart from A and B, so that large forget-loss gradients do not
        # shrink the routing loss's.
        groups = adapter_parameters(model)
        return [groups["A"] + groups["B"], groups["router"]]

    def save(self, model, directory: str, state: dict | None = None) -> None:
        save_adapter(model, directory, state)

    # ---------------------------------------------------------------- losses

    def forget_loss(self, logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the weight sum it is a mean over): IHL, weighted by entropy when guided."""
        if self.config.forget_loss == "nll_ascent":
            return -token_nll(logits, labels), _labelled(labels)
        flat_logits, flat_labels = _shift(logits, labels)
        weight = self.config.high_entropy_weight if self.entropy_guided else 1.0
        loss, entropy = inverted_hinge_loss(
            flat_logits, flat_labels, self.config.tsallis_q, self.config.entropy_threshold,
            high_entropy_weight=weight, backend=self.config.backend,
        )
        if self.reduce_sum is None:
            return loss, None
        return loss, token_weights(entropy, flat_labels == IGNORE_INDEX, self.config.entropy_threshold, weight).sum()

    def _structural(self, logits, batch):
        cfg = self.config
        if self.structural == "exact":
            return structural_exact(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, self.A_params)
        return structural_surrogate(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, cfg.backend)

    def _routing_pass(self, model, batch: dict, forget: bool) -> torch.Tensor:
        """Routing loss of the routers gating on their own, as at inference, with gradients
        for the routers only. Under forced routes a router would learn to recognize the
        forget experts' own effect on the layers below it, which is absent at inference
        whenever those layers route differently."""
        adapters = self.A_params + self.B_params
        # FSDP2 computes with gathered copies whose requires_grad it fixed when sharding:
        # there A and B keep their gradients from before the pass instead.
        kept = [param.grad for param in adapters] if self.sharded else None
        for param in adapters:
            param.requires_grad_(False)
        try:
            with forced_route(self.model, batch["expert"], gate=False), \
                    precomputed_entropy(self.model, batch["entropy"]):
                with self.autocast():
                    logits = model(**_model_inputs(batch)).logits
                # The positions routing_targets chose (docs/training.md, "Routing targets").
                routed = batch["route_mask"].bool()
                route = router_loss(self.model, routed)
                count = (routed & batch["attention_mask"].bool()).sum()
                loss = self.route_weight[forget] * self.global_mean(route, count)
                if self.sharded:
                    # The routing loss reaches the routers through logits recorded aside;
                    # through the model's output too, FSDP2 gathers every unit before
                    # its backward.
                    loss = loss + 0.0 * logits.sum()
                self.backward(loss)
        finally:
            for param in adapters:
                param.requires_grad_(True)
            if kept is not None:
                for param, grad in zip(adapters, kept):
                    param.grad = grad
        return route.detach()

    def _pass(self, model, batch: dict, forget: bool) -> dict:
        cfg = self.config
        gate = not self.router_routes
        with forced_route(self.model, batch["expert"], gate=gate), precomputed_entropy(self.model, batch["entropy"]):
            with self.autocast():
                logits = model(**_model_inputs(batch)).logits
            if forget:
                main, count = self.forget_loss(logits, batch["labels"])
                loss = cfg.beta * self.global_mean(main, count)
            else:
                main = token_nll(logits, batch["labels"])
                loss = cfg.gamma * self.global_mean(main, _labelled(batch["labels"]))
            logs = {"forget" if forget else "retain": main.detach()}
            if self.structural is not None:
                structure = self._structural(logits, batch)
                high = _high_entropy_tokens(batch, cfg.entropy_threshold)
                loss = loss + cfg.lam * self.global_mean(structure, high.sum())
                logs["structural"] = structure.detach()
            self.backward(loss)
        if forget and self.router_routes:
            # The forget loss trains the forget experts only: a forget token the router
            # sends to the retention expert must not teach it to forget.
            for B in self.B_params:
                if B.grad is not None:
                    _zero_expert(B.grad, RETENTION_EXPERT)
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


def _zero_expert(grad: torch.Tensor, expert: int) -> None:
    """``grad[expert] = 0`` for a B gradient ``[N, out, r]``, also when FSDP2 shards it
    (row-wise, as ``torch.chunk``: expert 0 is the first local row of the first shard)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(grad, DTensor):
        grad[expert].zero_()
        return
    if expert != 0 or grad.placements != (Shard(0),):
        raise NotImplementedError(f"zeroing expert {expert} of a gradient sharded as {grad.placements}")
    if grad.device_mesh.get_local_rank() == 0:
        grad.to_local()[0].zero_()
