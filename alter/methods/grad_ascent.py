"""Gradient ascent on the forget NLL (TOFU's baseline); needs no retain set."""
from alter.methods import register
from alter.methods.base import FullParameterMethod


@register
class GradAscent(FullParameterMethod):
    name = "grad_ascent"
    needs_retain = False
    uses_retain = False
