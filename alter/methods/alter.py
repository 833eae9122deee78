"""ALTER (the paper's method): AsymLoRA guided by the base model's token entropy. The
forget IHL weights high-entropy tokens by ``config.high_entropy_weight``, the structural
term (eq. 8) keeps the adapter from moving the entropy of structural tokens, and A learns
from high-entropy tokens only when ``config.a_learns_from_high_entropy_only`` (the
paper's setting; off by default, see :class:`~alter.config.AlterConfig`)."""
from alter.methods import register
from alter.methods.asym_lora import AsymLoRA


@register
class Alter(AsymLoRA):
    name = "alter"
    entropy_guided = True
