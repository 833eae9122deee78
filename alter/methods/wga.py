"""WGA, weighted gradient ascent (Wang et al., 2025, "Rethinking LLM Unlearning Objectives:
A Gradient Perspective and Go Beyond"): ascent on each forget token's NLL weighted by its
probability to the power beta (no gradient through the weight), plus the retain NLL.

    loss = gamma * -mean_t p_t^beta NLL_t + alpha * NLL(retain)
"""
import torch

from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import weighted_ascent
from alter.methods.retain import with_retain_nll


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA's forget term, a mean over labelled tokens. ``logits`` ``[B, L, V]``, ``labels``
    ``[B, L]`` int64 (-100 unlabelled)."""
    return weighted_ascent(logits, labels, beta, 0.0)


@register
class WGA(Method):
    name = "wga"
    defaults = {"beta": 1.0, "alpha": 1.0, "gamma": 1.0}  # open-unlearning configs/trainer/WGA.yaml

    def loss(self, model, forget, retain):
        hp = self.hparams
        forget_loss = wga_loss(self.logits(model, forget, True), forget["labels"], hp["beta"])
        loss, logs, _ = with_retain_nll(self, model, forget_loss, labelled(forget["labels"]), retain,
                                        hp["gamma"], hp["alpha"])
        return loss, logs
