"""Gradient ascent on the forget NLL (TOFU's baseline; open-unlearning's GradAscent,
``configs/trainer/GradAscent.yaml``: no hyper-parameters); reads no retain set.

    loss = -NLL(forget)
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import token_nll


@register
class GradAscent(Method):
    name = "grad_ascent"
    needs_retain = False

    def loss(self, model, forget, retain):
        forget_loss = -token_nll(self.logits(model, forget, True), forget["labels"])
        return self.global_mean(forget_loss, labelled(forget["labels"])), {"forget": forget_loss.detach()}
