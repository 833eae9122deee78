"""The unlearning methods, one module each: its loss, ``loss(model, forget, retain)``,
and what it needs (:mod:`alter.methods.base`). The adapter methods (``alter``,
``asym_lora``, ``lora``) train AsymLoRA adapters under the routing protocol of
:class:`~alter.methods.base.RoutedMethod`; the baselines (``grad_ascent``, ``grad_diff``,
``npo``) train every weight (the parameterizations: :mod:`alter.methods.params`).

A method registers its class under its ``name`` with :func:`register`; :func:`build`
makes the method of a run from its :class:`~alter.training.args.UnlearnArgs`.
"""
from __future__ import annotations

import importlib

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make ``cls`` the method named ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type:
    """The class of method ``name`` (one of ``METHODS``)."""
    return _registry()[name]


def build(args, autocast, engine=None):
    """The method of a run: ``method_class(args.method)(args, autocast, engine)``."""
    return method_class(args.method)(args, autocast, engine)


# The built-in methods, in the order the docs and the CLI list them; importing a module
# registers its class. Imported on first use, so that the names (and alter.methods.args)
# cost no torch import.
METHODS = ("alter", "asym_lora", "lora", "grad_ascent", "grad_diff", "npo",
           "simnpo", "dpo", "idk_dpo", "rmu", "undial", "ceu", "satimp", "wga", "pdu")


def _registry() -> dict[str, type]:
    for name in METHODS:
        importlib.import_module(f"alter.methods.{name}")
    return _REGISTRY


def method_names() -> tuple[str, ...]:
    """The built-in methods, then any registered since (a user's own module)."""
    return tuple(_registry())


def __getattr__(name: str):
    if name == "ADAPTER_METHODS":  # the methods that train routers, built-in and registered
        return tuple(m for m, cls in _registry().items() if cls.routed())
    raise AttributeError(f"module 'alter.methods' has no attribute {name!r}")
