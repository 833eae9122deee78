"""ALTER (the paper's method): AsymLoRA guided by the base model's token entropy.

    loss = beta * IHL_w(forget) + gamma * NLL(retain) + lam * structural
           (+ the routing loss, added by the asym_lora parameterization)

The forget IHL weights high-entropy tokens by ``config.high_entropy_weight``; the
structural term (eq. 8, over the high-entropy tokens of both batches) keeps the adapter
from moving the entropy of structural tokens; A learns from high-entropy tokens only
when ``config.a_learns_from_high_entropy_only`` (the paper's setting; off by default, see
:class:`~alter.config.AlterConfig`).
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import _high_entropy_tokens, structural_exact, structural_surrogate, token_nll


@register
class Alter(Method):
    name = "alter"
    default_params = "asym_lora"
    supported_params = ("asym_lora",)
    refused_params = dict.fromkeys(
        ("full", "lora"), "ALTER is an AsymLoRA method: its forget experts and structural term (the base model's cached "
        "entropy, the adapters' A) exist under params 'asym_lora' only")
    reads_config_weights = True

    def config_changes(self, config) -> dict:
        return {}  # the user's a_learns_from_high_entropy_only

    def structural(self, logits, batch):
        """(structural term of a batch, the count of high-entropy tokens it is a mean over)."""
        cfg = self.config
        if self.args.structural == "exact":
            term = structural_exact(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, self.parameters.A)
        else:
            term = structural_surrogate(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, cfg.backend)
        return term, _high_entropy_tokens(batch, cfg.entropy_threshold).sum()

    def loss(self, model, forget, retain):
        cfg = self.config
        loss, logs = 0.0, {}
        for batch, is_forget in ((forget, True), (retain, False)):
            logits = self.logits(model, batch, is_forget)
            if is_forget:
                term, count = self.ihl(logits, batch["labels"], cfg.high_entropy_weight)
                loss = loss + cfg.beta * self.global_mean(term, count)
            else:
                term = token_nll(logits, batch["labels"])
                loss = loss + cfg.gamma * self.global_mean(term, labelled(batch["labels"]))
            logs["forget" if is_forget else "retain"] = term.detach()
            if cfg.lam > 0:
                structure, high = self.structural(logits, batch)
                loss = loss + cfg.lam * self.global_mean(structure, high)
                logs["structural"] = logs.get("structural", 0.0) + structure.detach()
        return loss, logs
