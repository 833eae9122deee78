"""Gradient ascent on the forget NLL (TOFU's baseline); needs no retain set.

    loss = beta * -NLL(forget)
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import token_nll


@register
class GradAscent(Method):
    name = "grad_ascent"
    needs_retain = False

    def loss(self, model, forget, retain):
        forget_loss = -token_nll(self.logits(model, forget), forget["labels"])
        loss = self.config.beta * self.global_mean(forget_loss, labelled(forget["labels"]))
        return loss, {"forget": forget_loss.detach()}
