"""AsymLoRA without entropy: ALTER's sub-domain forget experts and routing, the inverted
hinge loss with uniform token weights, A learning from every token, no structural term.

    loss = beta * IHL(forget) + gamma * NLL(retain) + routing loss
"""
from alter.methods import register
from alter.methods.base import RoutedMethod, labelled
from alter.methods.losses import token_nll


@register
class AsymLoRA(RoutedMethod):
    name = "asym_lora"

    def config_changes(self, config) -> dict:
        return {**super().config_changes(config), "a_learns_from_high_entropy_only": False}

    def loss(self, model, forget, retain):
        cfg = self.config
        forget_loss, count = self.ihl(self.routed_logits(model, forget, True), forget["labels"], 1.0)
        retain_loss = token_nll(self.routed_logits(model, retain, False), retain["labels"])
        route, route_log = self.routing_loss(model, forget, retain)
        loss = (cfg.beta * self.global_mean(forget_loss, count)
                + cfg.gamma * self.global_mean(retain_loss, labelled(retain["labels"])) + route)
        return loss, {"forget": forget_loss.detach(), "retain": retain_loss.detach(), "route": route_log}
