"""PDU, primal-dual unlearning (Entesari et al., 2025, "Constrained Entropic Unlearning: A
Primal-Dual Framework for Large Language Models"): a logit-margin flattening loss on the
forget set under the constraint retain NLL <= eps, solved by primal-dual steps on the
retain term's weight lambda (its dual variable, starting at alpha).

    loss = gamma * mean_t (max_v z_tv - mean_v z_tv)^2 + lambda * (NLL(retain) - eps)
    lambda <- max(0, lambda + dual_step_size * (NLL(retain) - eps))   after each step past the warm-up
"""
import torch

from alter.data import IGNORE_INDEX


def pdu_forget_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logit-margin flattening term: the squared gap between the largest and the mean
    logit at each position that predicts a labelled token, a mean over them. ``logits``
    ``[B, L, V]``, ``labels`` ``[B, L]`` int64 (not shifted, -100 unlabelled)."""
    z = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    labelled = labels[:, 1:] != IGNORE_INDEX
    margin = (z.amax(-1) - z.mean(-1)) ** 2
    return (margin * labelled).sum() / labelled.sum().clamp_min(1)


def dual_update(weight: float, constraint: float, step_size: float) -> float:
    """Projected dual ascent: the retain weight after a step with constraint value
    ``constraint`` = retain NLL - eps (positive: violated)."""
    return max(0.0, weight + step_size * constraint)
