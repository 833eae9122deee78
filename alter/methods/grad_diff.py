"""GradDiff: ascent on the forget NLL plus descent on the retain NLL (TOFU's baseline).

    loss = beta * -NLL(forget) + gamma * NLL(retain)
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import token_nll


@register
class GradDiff(Method):
    name = "grad_diff"

    def loss(self, model, forget, retain):
        cfg = self.config
        forget_loss = -token_nll(self.logits(model, forget), forget["labels"])
        retain_loss = token_nll(self.logits(model, retain), retain["labels"])
        loss = (cfg.beta * self.global_mean(forget_loss, labelled(forget["labels"]))
                + cfg.gamma * self.global_mean(retain_loss, labelled(retain["labels"])))
        return loss, {"forget": forget_loss.detach(), "retain": retain_loss.detach()}
