"""Negative Preference Optimization (Zhang et al., 2024) against the log-probabilities of
the frozen starting model, computed once before training; needs no retain set."""
import torch

from alter.methods import register
from alter.methods.base import FullParameterMethod
from alter.methods.data import reference_logprobs, with_fields
from alter.methods.losses import npo_loss, sequence_logprob


@register
class NPO(FullParameterMethod):
    name = "npo"
    needs_retain = False
    uses_retain = False

    def setup(self, model, forget_examples, retain_examples, pad_id):
        reference = reference_logprobs(model, forget_examples, pad_id, self.args.batch_size)
        return super().setup(model, with_fields(forget_examples, ref_logprob=reference), retain_examples, pad_id)

    def forget_loss(self, logits, batch):
        logprob = sequence_logprob(logits, batch["labels"])
        loss = npo_loss(logprob, batch["ref_logprob"], self.args.npo_beta)
        return loss, torch.tensor(len(logprob), device=logprob.device)  # a mean over samples
