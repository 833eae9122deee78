"""GradDiff: ascent on the forget NLL plus descent on the retain NLL (TOFU's baseline;
open-unlearning's GradDiff with ``retain_loss_type: NLL``).

    loss = gamma * -NLL(forget) + alpha * NLL(retain)
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import token_nll


@register
class GradDiff(Method):
    name = "grad_diff"
    defaults = {"gamma": 1.0, "alpha": 1.0}  # open-unlearning configs/trainer/GradDiff.yaml

    def loss(self, model, forget, retain):
        forget_loss = -token_nll(self.logits(model, forget, True), forget["labels"])
        retain_loss = token_nll(self.logits(model, retain, False), retain["labels"])
        loss = (self.hparams["gamma"] * self.global_mean(forget_loss, labelled(forget["labels"]))
                + self.hparams["alpha"] * self.global_mean(retain_loss, labelled(retain["labels"])))
        return loss, {"forget": forget_loss.detach(), "retain": retain_loss.detach()}
