"""SatImp (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
Unlearning"): ascent on each forget token's NLL weighted by saturation ``p^beta1`` times
importance ``(1 - p)^beta2`` (no gradient through the weight), plus the retain NLL.

    loss = gamma * -mean_t p_t^beta1 (1 - p_t)^beta2 NLL_t + alpha * NLL(retain)
"""
import torch

from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import weighted_ascent
from alter.methods.retain import with_retain_nll


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp's forget term, a mean over labelled tokens. ``logits`` ``[B, L, V]``,
    ``labels`` ``[B, L]`` int64 (-100 unlabelled)."""
    return weighted_ascent(logits, labels, beta1, beta2)


@register
class SatImp(Method):
    name = "satimp"
    # open-unlearning configs/trainer/SatImp.yaml (its forget weight gamma is 0.1, not the class default)
    defaults = {"beta1": 5.0, "beta2": 1.0, "alpha": 1.0, "gamma": 0.1}

    def loss(self, model, forget, retain):
        hp = self.hparams
        forget_loss = satimp_loss(self.logits(model, forget, True), forget["labels"], hp["beta1"], hp["beta2"])
        loss, logs, _ = with_retain_nll(self, model, forget_loss, labelled(forget["labels"]), retain,
                                        hp["gamma"], hp["alpha"])
        return loss, logs
