"""SimNPO (Fan et al., 2024, "Simplicity Prevails: Rethinking Negative Preference
Optimization for LLM Unlearning"): NPO without the reference model, on the length-normalized
NLL of each forget answer, plus the retain NLL.

    loss = gamma * -(2/beta) mean_i log sigmoid(beta * (NLL_i / |y_i| - delta)) + alpha * NLL(retain)

|y_i|: the sample's labelled next-token targets (open-unlearning counts its labelled
positions, one more on a text row, whose first token is labelled but predicted by none).
"""
import torch
import torch.nn.functional as F

from alter.methods import register
from alter.methods.base import Method
from alter.methods.losses import token_logprobs
from alter.methods.retain import samples, with_retain_nll


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO's forget term, a mean over samples. ``logits`` ``[B, L, V]`` (float; computed
    in float32, or float64 for float64), ``labels`` ``[B, L]`` int64, -100 unlabelled. A
    sample without labelled tokens counts as mean NLL 0 (no division by zero)."""
    logp, labelled = token_logprobs(logits, labels)
    mean_nll = -logp.sum(-1) / labelled.sum(-1).clamp_min(1)
    # open-unlearning's delta is inside the beta scaling (the paper's gamma = beta * delta).
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


@register
class SimNPO(Method):
    name = "simnpo"
    # open-unlearning configs/trainer/SimNPO.yaml (delta: Unlearn-Simple's gamma; gamma: its npo_coeff)
    defaults = {"delta": 0.0, "beta": 4.5, "alpha": 1.0, "gamma": 0.125}

    def loss(self, model, forget, retain):
        hp = self.hparams
        forget_loss = simnpo_loss(self.logits(model, forget, True), forget["labels"], hp["beta"], hp["delta"])
        loss, logs, _ = with_retain_nll(self, model, forget_loss, samples(forget), retain, hp["gamma"], hp["alpha"])
        return loss, logs
