"""CE-U, cross-entropy unlearning (Yang, 2025, "CE-U: Cross Entropy Unlearning"): the
cross-entropy of the model's next-token distribution against itself with the true token
removed (its logit at -inf, no gradient through the target); reads no retain set. The
first ``ignore_first_n_answer_tokens`` labelled tokens of each answer are left out (the
paper's footnote on its training settings, as open-unlearning).

    loss = mean_t CE(softmax(stopgrad(z_t) with z_t[y_t] = -inf), softmax(z_t))
"""
import torch

from alter.data import IGNORE_INDEX
from alter.methods import register
from alter.methods.base import Method


def ceu_targets(labels: torch.Tensor, ignore_first: int) -> torch.Tensor:
    """The targets CE-U trains on: bool ``[B, L-1]``, the labelled next-token targets after
    each row's first ``ignore_first``. ``labels`` ``[B, L]`` int64 (not shifted)."""
    labelled = labels != IGNORE_INDEX
    return (labelled & (labelled.cumsum(-1) > ignore_first))[:, 1:]


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_first: int) -> torch.Tensor:
    """CE-U over :func:`ceu_targets`, a mean over them. ``logits`` ``[B, L, V]``, ``labels``
    ``[B, L]`` int64 (not shifted, -100 unlabelled). Computed in float32 (float64 for
    float64 logits). Its gradient in ``z_t`` is ``(p_t - q_t) / n``, ``q_t`` the target."""
    kept = ceu_targets(labels, ignore_first)
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    removed = logp.detach().scatter(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1), float("-inf"))
    ce = -(torch.softmax(removed, dim=-1) * logp).sum(-1)
    return (ce * kept).sum() / kept.sum().clamp_min(1)


@register
class CEU(Method):
    name = "ceu"
    needs_retain = False
    defaults = {"ignore_first_n_answer_tokens": 1}  # open-unlearning configs/trainer/CEU.yaml

    def loss(self, model, forget, retain):
        ignore_first = self.hparams["ignore_first_n_answer_tokens"]
        forget_loss = ceu_loss(self.logits(model, forget, True), forget["labels"], ignore_first)
        count = ceu_targets(forget["labels"], ignore_first).sum()
        return self.global_mean(forget_loss, count), {"forget": forget_loss.detach()}
