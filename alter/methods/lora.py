"""One plain LoRA adapter trained with the GradDiff objective: AsymLoRA with every token
forced to expert 0 and one expert kept per token at inference."""
from alter.methods import register
from alter.methods.base import AdapterMethod, _labelled
from alter.methods.losses import token_nll


@register
class LoRA(AdapterMethod):
    name = "lora"
    forget_experts = "retention"

    def config_changes(self, config) -> dict:
        # One adapter: each token keeps only its top expert, which the router learns is 0.
        return {**super().config_changes(config), "k_high": 1, "k_low": 1}

    def forget_loss(self, logits, labels):
        return -token_nll(logits, labels), _labelled(labels)
