"""UNDIAL (Dong et al., 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models"): self-distillation on the forget set towards the
starting model's next-token distribution with the target token's logit lowered by beta.

    loss = gamma * mean_t CE(softmax(z_ref_t - beta * onehot(y_t)), softmax(z_t)) + alpha * NLL(retain)
"""
import torch

from alter.data import IGNORE_INDEX
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.retain import with_retain_nll


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


@register
class UNDIAL(Method):
    name = "undial"
    needs_retain = False  # alpha = 0 by default; a run with alpha > 0 needs one (checked in prepare)
    needs_reference = True
    # open-unlearning configs/trainer/UNDIAL.yaml (there with lr 1e-4, 10 epochs)
    defaults = {"beta": 10.0, "alpha": 0.0, "gamma": 1.0}

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        if self.hparams["alpha"] != 0 and not retain_examples:
            raise ValueError(f"undial with alpha={self.hparams['alpha']} adds the retain NLL: it needs a retain set")
        return forget_examples, retain_examples

    def loss(self, model, forget, retain):
        hp = self.hparams
        reference = self.reference_outputs(model, forget).logits
        forget_loss = undial_loss(self.logits(model, forget, True), reference, forget["labels"], hp["beta"])
        # alpha = 0: no retain forward (a run on adapters has a retain batch for the routers)
        loss, logs, _ = with_retain_nll(self, model, forget_loss, labelled(forget["labels"]),
                                        retain if hp["alpha"] else None, hp["gamma"], hp["alpha"])
        return loss, logs
