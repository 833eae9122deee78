"""Old path of :mod:`alter.adapters.layers`."""
from alter.adapters.layers import AlterRouter, AsymLoRALinear  # noqa: F401
