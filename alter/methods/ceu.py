"""CE-U, cross-entropy unlearning (Yang, 2025, "CE-U: Cross Entropy Unlearning"): the
cross-entropy of the model's next-token distribution against itself with the true token
removed (its logit at -inf, no gradient through the target); needs no retain set. The
first ``ignore_first_n_answer_tokens`` labelled tokens of each answer are left out (the
paper's footnote on its training settings, as open-unlearning).

    loss = mean_t CE(softmax(stopgrad(z_t) with z_t[y_t] = -inf), softmax(z_t))
"""
import torch

from alter.data import IGNORE_INDEX


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_first: int) -> torch.Tensor:
    """CE-U over the labelled targets after each row's first ``ignore_first``, a mean over
    them. ``logits`` ``[B, L, V]``, ``labels`` ``[B, L]`` int64 (not shifted, -100
    unlabelled). Its gradient in ``z_t`` is ``(p_t - q_t) / n``, ``q_t`` the target."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    labelled = labels != IGNORE_INDEX
    kept = (labelled & (labelled.cumsum(-1) > ignore_first))[:, 1:]
    targets = labels[:, 1:].clamp_min(0).unsqueeze(-1)
    logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    removed = logp.detach().scatter(-1, targets, float("-inf"))
    soft = torch.softmax(removed, dim=-1)
    ce = -(soft * logp).sum(-1)
    return (ce * kept).sum() / kept.sum().clamp_min(1)
