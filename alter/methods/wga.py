"""WGA, weighted gradient ascent (Wang et al., 2025, "Rethinking LLM Unlearning Objectives:
A Gradient Perspective and Go Beyond"): ascent on each forget token's NLL weighted by its
probability to the power beta (no gradient through the weight), plus the retain NLL.

    loss = gamma * -mean_t p_t^beta NLL_t + alpha * NLL(retain)
"""
import torch

from alter.methods.losses import weighted_ascent


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA's forget term, a mean over labelled tokens. ``logits`` ``[B, L, V]``, ``labels``
    ``[B, L]`` int64 (-100 unlabelled)."""
    return weighted_ascent(logits, labels, beta, 0.0)
