"""Negative Preference Optimization (Zhang et al., 2024, arXiv:2404.05868) against the
log-probabilities of the frozen starting model, computed once before training, plus the
retain NLL (open-unlearning's NPO with ``retain_loss_type: NLL``).

    loss = gamma * -(2 / beta) * mean log sigmoid(-beta * log(pi(y|x) / pi_ref(y|x)))
           + alpha * NLL(retain)

log pi(y|x): the sum over the answer's tokens (open-unlearning's ``compute_batch_nll``).
"""
import torch

from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.data import reference_logprobs, with_fields
from alter.methods.losses import npo_loss, sequence_logprob, token_nll


@register
class NPO(Method):
    name = "npo"
    defaults = {"beta": 0.1, "alpha": 1.0, "gamma": 1.0}  # open-unlearning configs/trainer/NPO.yaml

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        reference = reference_logprobs(model, forget_examples, pad_id, self.args.batch_size)
        return with_fields(forget_examples, ref_logprob=reference), retain_examples

    def loss(self, model, forget, retain):
        logprob = sequence_logprob(self.logits(model, forget, True), forget["labels"])
        forget_loss = npo_loss(logprob, forget["ref_logprob"], self.hparams["beta"])
        retain_loss = token_nll(self.logits(model, retain, False), retain["labels"])
        count = torch.tensor(len(logprob), device=logprob.device)  # a mean over samples
        loss = (self.hparams["gamma"] * self.global_mean(forget_loss, count)
                + self.hparams["alpha"] * self.global_mean(retain_loss, labelled(retain["labels"])))
        return loss, {"forget": forget_loss.detach(), "retain": retain_loss.detach()}
