"""What the :class:`~alter.adapters.state.EntropyTracker` hooks need from a Hugging Face
model: its forward's inputs by name, its logits, its KV cache, the base model's entropy
(the prepass, fused with the head when the head is a plain linear map, with the base
model's own KV cache when decoding), and two
instance overrides (the checkpoint function and the beam reorder) that keep per-call
state right."""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from transformers import Cache

from alter.adapters.cache_link import cache_length
from alter_kernels import fused_linear_entropy, tsallis_entropy

_CACHE_INPUTS = ("cache", "past_key_values")  # transformers >= 5.x renames the latter
# Inputs of a causal LM forward that the base-model prepass repeats; the cache is left
# out on purpose: the prepass must neither read nor extend the adapted model's cache.
_PREPASS_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """No gradients and eval mode (no dropout); each module's mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


class StatefulCheckpoint:
    """A checkpoint function that runs (and so recomputes) its block under the state of
    the call it was first run in: the recompute happens during backward, when later calls
    may have run."""

    def __init__(self, checkpoint, tracker):
        self.checkpoint, self.tracker = checkpoint, tracker

    def __call__(self, function, *args, **kwargs):
        calls = self.tracker._calls
        if not calls:
            return self.checkpoint(function, *args, **kwargs)
        state, running = calls[-1], self.tracker.running

        def under_state(*inner_args, **inner_kwargs):
            with running(state):
                return function(*inner_args, **inner_kwargs)

        return self.checkpoint(under_state, *args, **kwargs)


class BeamReorder:
    """An instance ``_reorder_cache`` on the patched model: transformers' beam search calls
    it to reorder the KV cache between steps. The state linked to that cache is reordered
    with it: the carried sequence routes, the ``"lagged"`` entropy (each beam's next token
    is gated by the entropy of the distribution it was chosen from, its parent beam's)
    and the prepass's base-model cache. ``remove()`` takes it off, like a hook handle."""

    def __init__(self, model: nn.Module, tracker):
        self.model, self.tracker = model, tracker
        self.original = getattr(model, "_reorder_cache", None)
        model._reorder_cache = self

    def __call__(self, cache, beam_idx):
        self.tracker.reorder(cache, beam_idx)
        if self.original is not None:
            return self.original(cache, beam_idx)
        cache.reorder_cache(beam_idx)
        return cache

    def remove(self) -> None:
        if self.model.__dict__.get("_reorder_cache") is self:
            del self.model.__dict__["_reorder_cache"]


@functools.lru_cache(maxsize=64)
def _method_signature(function) -> inspect.Signature:
    """The signature of a method's function without ``self``: computing a signature costs
    ~100 µs (a decode step's budget for a whole layer), so it is computed once per function."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    bound_self = parameters and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return signature.replace(parameters=parameters[1:] if bound_self else parameters)


def named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward's arguments by name (positional ones bound to the signature)."""
    if not args:
        inputs = dict(kwargs)
    else:
        forward = model.forward
        function = getattr(forward, "__func__", None)
        signature = inspect.signature(forward) if function is None else _method_signature(function)
        bound = signature.bind_partial(*args, **kwargs)
        inputs = {}
        for name, value in bound.arguments.items():
            param = bound.signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(value)
            else:
                inputs[name] = value
    return inputs


def token_input(inputs: dict) -> torch.Tensor:
    """The forward's ``input_ids`` [B, L] or else ``inputs_embeds`` [B, L, D]."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(inputs.get(key), torch.Tensor):
            return inputs[key]
    raise ValueError("the patched model needs input_ids or inputs_embeds to know its tokens")


def output_logits(output) -> torch.Tensor:
    """The logits [B, L, V] of a causal LM's output; a ``return_dict=False`` tuple starts
    with the loss when labels were given, so take its first 3-D tensor."""
    if hasattr(output, "logits"):
        return output.logits
    return next(t for t in output if isinstance(t, torch.Tensor) and t.dim() == 3)


def input_cache(inputs: dict):
    """(input name, KV cache object) of a forward, or (None, None) without one."""
    for key in _CACHE_INPUTS:
        cache = inputs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return key, cache
    return None, None


def output_cache(output):
    """The KV cache a forward returned (None when it kept none), from a model output or
    the tuple of ``return_dict=False``."""
    if isinstance(output, tuple):
        return next((item for item in output if isinstance(item, Cache)), None)
    for key in _CACHE_INPUTS:
        cache = getattr(output, key, None)
        if cache is not None:
            return cache
    return None


def returns_cache(model: nn.Module, inputs: dict) -> bool:
    """Whether the forward builds a KV cache (``use_cache``, by default the model config's)."""
    use_cache = inputs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(getattr(model, "config", None), "use_cache", False)
    return bool(use_cache) and not model.training


def feeds_cache(model: nn.Module, inputs: dict) -> bool:
    """Whether the forward continues a KV cache (one that holds tokens comes in) or builds one."""
    _, cache = input_cache(inputs)
    return (cache is not None and cache_length(cache) > 0) or returns_cache(model, inputs)


def logits_are_plain_linear(model: nn.Module, head: nn.Module) -> bool:
    """True when logits = head(final hidden states) exactly, so the fused entropy applies."""
    config = getattr(model, "config", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and hasattr(model, "base_model_prefix")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
        and getattr(config, "logits_scaling", None) in (None, 1, 1.0)
    )


def base_model_entropy(model: nn.Module, inputs: dict, config, base_pass, cache=None, keep_cache=False):
    """(entropy [B, L] float32 of the base model's next-token distributions for
    ``inputs``, the base model's KV cache or None), run inside ``base_pass`` (a context:
    no grad, adapters off, eval mode, no hook re-entry).

    The base model never reads the adapted model's cache. ``cache``: the base model's own
    cache of the earlier tokens (decoding: only the new tokens run); ``keep_cache``: return
    that cache, extended (or a new one), for the next decoded tokens."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise RuntimeError(
            f"entropy_source={config.entropy_source!r} needs a causal LM with an output head "
            f"(get_output_embeddings()); {type(model).__name__} has none: use entropy_source='precomputed'"
        )
    head = getattr(head, "base_layer", head)  # an adapted head: its frozen base
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise RuntimeError(
            "the entropy prepass needs a 2D attention_mask [batch, seq_len] (a 4D or cache-shaped mask "
            "cannot be replayed without the cache)"
        )
    base_inputs = {k: inputs[k] for k in _PREPASS_INPUTS if inputs.get(k) is not None}
    key = input_cache(inputs)[0] or _CACHE_INPUTS[0]
    if cache is not None:
        base_inputs[key] = cache
    q, backend = config.tsallis_q, config.backend
    with base_pass:
        if logits_are_plain_linear(model, head):
            decoder = getattr(model, model.base_model_prefix)
            output = decoder(**base_inputs, use_cache=keep_cache)
            hidden = output.last_hidden_state
            entropy = fused_linear_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, q, backend=backend)
            entropy = entropy.reshape(hidden.shape[:-1])
        else:
            output = model(**base_inputs, use_cache=keep_cache)
            entropy = tsallis_entropy(output.logits, q, backend=backend)
    return entropy, output_cache(output) if keep_cache else None
