"""AsymLoRA without entropy: sub-domain forget experts and routing as ALTER, IHL with
uniform token weights, A learning from every token, no structural term."""
from alter.methods import register
from alter.methods.base import AdapterMethod


@register
class AsymLoRA(AdapterMethod):
    name = "asym_lora"
