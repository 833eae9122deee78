"""The unlearning methods, one module each: its loss, ``loss(model, forget, retain)``,
its hyper-parameters and what it needs (:mod:`alter.methods.base`). Each runs on the
parameterizations it supports (:mod:`alter.methods.params`: ``"full"`` weights, one
``"lora"`` adapter, or ``"asym_lora"`` adapters under the routing protocol), by default
its ``default_params``: ``alter`` and ``asym_lora`` on AsymLoRA, ``lora`` (grad_diff on
one LoRA adapter, a kept name) on LoRA, the open-unlearning baselines on every weight.

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
# What `alter demo` runs unless told (--methods): ALTER, AsymLoRA and LoRA, GradDiff and NPO,
# and the strongest published full-parameter baselines (SimNPO, RMU, UNDIAL); every method
# costs the five seeds' time.
DEMO_METHODS = ("alter", "asym_lora", "lora", "grad_diff", "npo", "simnpo", "rmu", "undial")


def _registry() -> dict[str, type]:
    """The registered classes, the built-in ones in METHODS order (a module may import
    another's class: lora imports grad_diff), then the others."""
    for name in METHODS:
        importlib.import_module(f"alter.methods.{name}")
    return {**{name: _REGISTRY[name] for name in METHODS}, **_REGISTRY}


def parse_run(name: str) -> tuple[str, str | None]:
    """(method, params) of a run name, ``"method"`` or ``"method@params"`` (params None:
    the method's default). ValueError when the method is unknown or refuses the params."""
    method, _, params = name.partition("@")
    if method not in _registry():
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_registry())}")
    method_class(method).resolve_params(params or None)
    return method, params or None


def method_names() -> tuple[str, ...]:
    """The built-in methods, then any registered since (a user's own module)."""
    return tuple(_registry())


def __getattr__(name: str):
    if name == "ADAPTER_METHODS":  # the methods whose default params train routers, built-in and registered
        return tuple(m for m, cls in _registry().items() if cls.routed())
    raise AttributeError(f"module 'alter.methods' has no attribute {name!r}")
