"""ALTER (the paper's method): AsymLoRA guided by the base model's token entropy. The
forget IHL weights high-entropy tokens by ``config.high_entropy_weight``, A learns from
high-entropy tokens only, and the structural term (eq. 8) keeps the adapter from moving
the entropy of structural tokens."""
from alter.methods import register
from alter.methods.asym_lora import AsymLoRA


@register
class Alter(AsymLoRA):
    name = "alter"
    entropy_guided = True
