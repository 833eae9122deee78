"""Parameterizations: which weights a method trains, with which optimizer, and what a run
saves. A choice apart from the method's loss (:mod:`alter.methods.base`).

``"full"``: every weight of the model (AdamW, weight decay 0.01, at ``args.lr``); the
result is the model (``save_pretrained``). ``"asym_lora"``: the model patched with
AsymLoRA adapters (``apply_alter``), the base frozen; A at ``config.lr_A``, B at
``config.lr_B``, the routers at ``args.router_lr`` (default ``lr_B``); the result is the
adapter (``save_adapter``).
"""
from __future__ import annotations

import torch

from alter.adapters import adapter_parameters, apply_alter, save_adapter


class FullParameters:
    """Every weight trains; the result is the model."""

    routed = False  # no routers: no router warm-up, every parameter gets a gradient each step

    def __init__(self, args):
        self.args = args

    def setup(self, model, config) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.args.lr, weight_decay=0.01)

    def attach(self, model) -> None:
        """Read the parameters from ``model``, again after an engine replaced them."""

    def clip_groups(self, model) -> list[list[torch.nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately."""
        return [[p for p in model.parameters() if p.requires_grad]]

    def save(self, model, directory: str, state: dict | None = None) -> None:
        """Write the result; ``state``: the model's full tensors when its own are shards."""
        model.save_pretrained(directory, state_dict=state)


class AsymLoRAParameters(FullParameters):
    """AsymLoRA adapters on a frozen base; the result is the adapter."""

    routed = True

    def setup(self, model, config) -> torch.optim.Optimizer:
        apply_alter(model, config)
        groups = adapter_parameters(model)
        router_lr = self.args.router_lr
        return torch.optim.AdamW(
            [{"params": groups["A"], "lr": config.lr_A}, {"params": groups["B"], "lr": config.lr_B},
             {"params": groups["router"], "lr": config.lr_B if router_lr is None else router_lr}],
            weight_decay=0.0,
        )

    def attach(self, model) -> None:
        groups = adapter_parameters(model)
        self.A, self.B = groups["A"], groups["B"]

    def clip_groups(self, model):
        # The routers apart from A and B, so that large forget-loss gradients do not
        # shrink the routing loss's.
        groups = adapter_parameters(model)
        return [groups["A"] + groups["B"], groups["router"]]

    def save(self, model, directory: str, state: dict | None = None) -> None:
        save_adapter(model, directory, state)


PARAMETERIZATIONS = {"full": FullParameters, "asym_lora": AsymLoRAParameters}
