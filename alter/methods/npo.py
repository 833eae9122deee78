"""Negative Preference Optimization (Zhang et al., 2024) against the log-probabilities of
the frozen starting model, computed once before training; needs no retain set.

    loss = beta * -(2 / npo_beta) * mean log sigmoid(-npo_beta * log(pi(y|x) / pi_ref(y|x)))
"""
import torch

from alter.methods import register
from alter.methods.base import Method
from alter.methods.data import reference_logprobs, with_fields
from alter.methods.losses import npo_loss, sequence_logprob


@register
class NPO(Method):
    name = "npo"
    needs_retain = False

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        reference = reference_logprobs(model, forget_examples, pad_id, self.args.batch_size)
        return with_fields(forget_examples, ref_logprob=reference), retain_examples

    def loss(self, model, forget, retain):
        logprob = sequence_logprob(self.logits(model, forget), forget["labels"])
        forget_loss = npo_loss(logprob, forget["ref_logprob"], self.args.npo_beta)
        count = torch.tensor(len(logprob), device=logprob.device)  # a mean over samples
        return self.config.beta * self.global_mean(forget_loss, count), {"forget": forget_loss.detach()}
