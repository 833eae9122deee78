"""GradDiff: ascent on the forget NLL plus descent on the retain NLL (TOFU's baseline)."""
from alter.methods import register
from alter.methods.base import FullParameterMethod


@register
class GradDiff(FullParameterMethod):
    name = "grad_diff"
