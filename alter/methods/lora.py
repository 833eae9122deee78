"""``lora``: the former method name of one plain LoRA adapter trained with the GradDiff
objective, kept as an alias of ``method="grad_diff", params="lora"`` (same loss, same
results; its run records say ``lora``).

    loss = gamma * -NLL(forget) + alpha * NLL(retain) + routing loss
"""
from alter.methods import register
from alter.methods.grad_diff import GradDiff

_ALIAS = "'lora' is grad_diff on params 'lora'; for GradDiff on {} use method='grad_diff', params='{}'"


@register
class LoRA(GradDiff):
    name = "lora"
    default_params = "lora"
    supported_params = ("lora",)
    refused_params = {"full": _ALIAS.format("every weight", "full"), "asym_lora": _ALIAS.format("AsymLoRA", "asym_lora")}
