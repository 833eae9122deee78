"""Placeholder until its owner lands it."""
def tsallis_entropy(*args, **kwargs):
    raise NotImplementedError


def fused_linear_entropy(*args, **kwargs):
    raise NotImplementedError


