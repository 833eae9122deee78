"""UNDIAL (Dong et al., 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models"): self-distillation on the forget set towards the
starting model's next-token distribution with the target token's logit lowered by beta.

    loss = gamma * mean_t CE(softmax(z_ref_t - beta * onehot(y_t)), softmax(z_t)) + alpha * NLL(retain)
"""
import torch

from alter.data import IGNORE_INDEX


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """UNDIAL's forget term, a mean over the labelled targets. ``logits`` and ``ref_logits``
    (the starting model's, no gradient) ``[B, L, V]``, ``labels`` ``[B, L]`` int64 (not
    shifted, -100 unlabelled). Computed in float32 (float64 for float64 logits)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    adjusted = ref_logits[:, :-1].detach().to(dtype).scatter_add(
        -1, targets.clamp_min(0).unsqueeze(-1), torch.full_like(targets, -beta, dtype=dtype).unsqueeze(-1))
    soft = torch.softmax(adjusted, dim=-1)
    ce = -(soft * torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)).sum(-1)
    return (ce * labelled).sum() / labelled.sum().clamp_min(1)
