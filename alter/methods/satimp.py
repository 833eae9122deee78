"""SatImp (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
Unlearning"): ascent on each forget token's NLL weighted by saturation ``p^beta1`` times
importance ``(1 - p)^beta2`` (no gradient through the weight), plus the retain NLL.

    loss = gamma * -mean_t p_t^beta1 (1 - p_t)^beta2 NLL_t + alpha * NLL(retain)
"""
import torch

from alter.methods.losses import weighted_ascent


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp's forget term, a mean over labelled tokens. ``logits`` ``[B, L, V]``,
    ``labels`` ``[B, L]`` int64 (-100 unlabelled)."""
    return weighted_ascent(logits, labels, beta1, beta2)
