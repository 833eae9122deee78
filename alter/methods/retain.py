"""The retain term of the open-unlearning methods built on its GradDiff
(``retain_loss_type: NLL``): ``loss = gamma * forget + alpha * NLL(retain)``."""
from __future__ import annotations

import torch

from alter.methods.base import labelled
from alter.methods.losses import token_nll


def with_retain_nll(method, model, forget_loss: torch.Tensor, forget_count: torch.Tensor, retain: dict | None,
                    gamma: float, alpha: float) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """``gamma * forget_loss + alpha * NLL(retain)``, each rescaled by ``method.global_mean``
    (``forget_loss`` a mean over ``forget_count`` local tokens or samples); no retain
    term when ``retain`` is None. Returns (loss, the terms to log, the retain NLL detached
    or None)."""
    loss = gamma * method.global_mean(forget_loss, forget_count)
    logs = {"forget": forget_loss.detach()}
    if retain is None:
        return loss, logs, None
    retain_loss = token_nll(method.logits(model, retain, False), retain["labels"])
    loss = loss + alpha * method.global_mean(retain_loss, labelled(retain["labels"]))
    logs["retain"] = retain_loss.detach()
    return loss, logs, retain_loss.detach()


def samples(batch: dict) -> torch.Tensor:
    """The count of a mean over a batch's samples, for ``global_mean``."""
    return torch.tensor(batch["labels"].shape[0], device=batch["labels"].device)
