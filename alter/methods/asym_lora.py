"""``asym_lora``: AsymLoRA without entropy, ALTER's ablation: the inverted hinge loss with
uniform token weights, A learning from every token, no structural term. On its default
params ``"asym_lora"`` it trains ALTER's sub-domain forget experts and routing; on
``"lora"`` or ``"full"`` it is the IHL objective on one adapter or every weight.

    loss = beta * IHL(forget) + gamma * NLL(retain)   (+ routing loss under the adapters)
           + gamma * NLL(the forget rows' predictable tokens)   (config.forget_tokens, as ALTER;
                                                                under the floor those below it)

and, as ALTER, every forget token aimed at the retain n-gram's floor under ``config.forget_floor``.
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import token_nll


@register
class AsymLoRA(Method):
    name = "asym_lora"
    default_params = "asym_lora"
    reads_config_weights = True

    def loss(self, model, forget, retain):
        cfg = self.config
        forget_logits = self.logits(model, forget, True)
        forget = self.toward_floor(forget_logits, forget)
        forget_loss, count = self.ihl(forget_logits, forget["labels"], 1.0)
        retain_loss = token_nll(self.logits(model, retain, False), retain["labels"])
        loss = (cfg.beta * self.global_mean(forget_loss, count)
                + cfg.gamma * self.global_mean(retain_loss, labelled(retain["labels"])))
        logs = {"forget": forget_loss.detach(), "retain": retain_loss.detach()}
        return self.with_kept_tokens(loss, logs, forget_logits, forget), logs
