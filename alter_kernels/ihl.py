"""Placeholder until its owner lands it."""
def inverted_hinge_loss(*args, **kwargs):
    raise NotImplementedError


