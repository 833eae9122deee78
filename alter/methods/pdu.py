"""PDU, primal-dual unlearning (Entesari et al., 2025, "Constrained Entropic Unlearning: A
Primal-Dual Framework for Large Language Models"): a logit-margin flattening loss on the
forget set under the constraint retain NLL <= eps, solved by primal-dual steps on the
retain term's weight lambda (its dual variable, starting at alpha).

    loss = gamma * mean_t (max_v z_tv - mean_v z_tv)^2 + lambda * (NLL(retain) - eps)
    lambda <- max(0, lambda + dual_step_size * (NLL(retain) - eps))   after each step past the warm-up
"""
import math

import torch

from alter.data import IGNORE_INDEX
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.data import reference_logprobs
from alter.methods.retain import with_retain_nll


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


@register
class PDU(Method):
    """The retain weight lambda (``alpha`` at the start) and the step count live in the
    method: a resumed run starts them afresh."""

    name = "pdu"
    # open-unlearning configs/trainer/PDU.yaml, dual_update_upon "step" (the only one here).
    # Its retain_loss_eps is required (???); a negative value here means the starting model's
    # retain NLL, measured at setup (the method's README: a value at or above that start).
    defaults = {"retain_loss_eps": -1.0, "primal_dual": True, "dual_step_size": 1.0, "dual_warmup_epochs": 5,
                "gamma": 1.0, "alpha": 1.0}

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        hp = self.hparams
        self.eps = hp["retain_loss_eps"]
        if self.eps < 0:
            reference = reference_logprobs(model, retain_examples, pad_id, self.args.batch_size)
            count = sum(label != IGNORE_INDEX for example in retain_examples for label in example["labels"][1:])
            self.eps = -sum(reference) / max(count, 1)
        self.retain_weight = hp["alpha"]
        self.steps, self.steps_per_epoch = 0, math.ceil(len(forget_examples) / self.args.batch_size)
        return forget_examples, retain_examples

    def loss(self, model, forget, retain):
        hp = self.hparams
        forget_loss = pdu_forget_loss(self.logits(model, forget, True), forget["labels"])
        # lambda * (NLL - eps): eps moves the value, not the gradient.
        loss, logs, retain_loss = with_retain_nll(self, model, forget_loss, labelled(forget["labels"]), retain,
                                                  hp["gamma"], self.retain_weight)
        logs["retain_weight"] = forget_loss.new_tensor(self.retain_weight)
        loss = loss - self.retain_weight * self.eps
        past_warmup = self.steps >= hp["dual_warmup_epochs"] * self.steps_per_epoch
        if hp["primal_dual"] and past_warmup:
            self.retain_weight = dual_update(self.retain_weight, self.global_value(retain_loss, retain) - self.eps,
                                             hp["dual_step_size"])
        self.steps += 1
        return loss, logs

    def global_value(self, retain_loss: torch.Tensor, retain: dict) -> float:
        """The retain NLL over the global batch (every process updates lambda alike)."""
        if self.reduce_sum is None:
            return retain_loss.item()
        count = labelled(retain["labels"]).float()
        return (self.reduce_sum(retain_loss.float() * count) / self.reduce_sum(count.clone()).clamp_min(1)).item()
