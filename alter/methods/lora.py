"""One plain LoRA adapter trained with the GradDiff objective: AsymLoRA with every token
forced to expert 0 and one expert kept per token at inference.

    loss = beta * -NLL(forget) + gamma * NLL(retain) + routing loss
"""
from alter.methods import register
from alter.methods.asym_lora import AsymLoRA
from alter.methods.base import labelled
from alter.methods.losses import token_nll


@register
class LoRA(AsymLoRA):
    name = "lora"
    has_forget_experts = False

    def config_changes(self, config) -> dict:
        # One adapter: each token keeps only its top expert, which the router learns is 0.
        return {**super().config_changes(config), "k_high": 1, "k_low": 1}

    def loss(self, model, forget, retain):
        cfg = self.config
        forget_loss = -token_nll(self.routed_logits(model, forget, True), forget["labels"])
        retain_loss = token_nll(self.routed_logits(model, retain, False), retain["labels"])
        route, route_log = self.routing_loss(model, forget, retain)
        loss = (cfg.beta * self.global_mean(forget_loss, labelled(forget["labels"]))
                + cfg.gamma * self.global_mean(retain_loss, labelled(retain["labels"])) + route)
        return loss, {"forget": forget_loss.detach(), "retain": retain_loss.detach(), "route": route_log}
