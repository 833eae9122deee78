"""Merging adapters into the base weights for serving (PEFT's ``merge_and_unload``), where
the routes allow it: a layer whose router sends every token of the given data to one
expert e with gate >= ``threshold`` computes ``W0 x + s·B_e A x`` there, which one
``nn.Linear`` of weight ``W0 + s·B_e A`` computes with no adapter cost.

    report = merge_adapters(model, input_ids, threshold=0.999)
    report.merged, report.kept, report.max_logit_difference
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from alter.adapters.hooks import evaluating
from alter.adapters.layers import AsymLoRALinear, routing_constants
from alter.adapters.patching import _set_submodule, _tracker, alter_layers, remove_alter
from alter_kernels.routing import dense_gate


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_adapters` did.

    merged: {module path: the expert merged into its weight}; kept: {module path: why it
    stays patched}; max_logit_difference: max |logits after - logits before| over the
    data's (unpadded) positions, measured after merging (0.0 when nothing merged);
    unpatched: True when every layer merged and the model is a plain model again.
    """

    merged: dict[str, int]
    kept: dict[str, str]
    max_logit_difference: float
    unpatched: bool


def merge_adapters(model: nn.Module, data, threshold: float = 0.999) -> MergeReport:
    """Merge into the base weights every adapted layer whose routes on ``data`` are one
    expert with gate >= ``threshold`` for every token; keep the others patched.

    data (required: the routes are measured on it): token ids [B, L] (int tensor), a dict
    of model inputs (``input_ids``, optional ``attention_mask`` [B, L]), or a list of
    either; the model's own entropy source
    gates it (with ``"precomputed"``, give the entropy around the call). Equivalence
    holds on that data only (measured: ``max_logit_difference``), not beyond it.

    Under ``"prepass"`` and ``"lagged"`` (whose prompts are gated by a prepass) the
    entropy is the base model's, which a partly merged model would change (the merged
    layers would join the base pass), so layers merge only when all of them qualify; the
    model is then unpatched (no prepass left). Under ``"precomputed"`` any subset merges.
    Under ``routing="sequence"`` nothing merges: an input with a key would need the
    forget experts. Merged layers become new ``nn.Linear`` modules (the original base layers are left
    untouched); their weights are computed in float64 and stored in the base dtype.
    """
    tracker = _tracker(model, "merge_adapters")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"merge_adapters: threshold must be a number in (0, 1], got {threshold!r}")
    batches = _batches(data)
    layers = alter_layers(model)
    if tracker.config.routing == "sequence":  # merged, a layer would lose the forget experts the keys select
        reason = "routing='sequence': the keys route any later input to the forget experts"
        return MergeReport({}, dict.fromkeys(layers, reason), 0.0, unpatched=False)
    routes = {name: _Routes() for name in layers}
    handles = [layer.register_forward_hook(routes[name].hook) for name, layer in layers.items()]
    try:
        before = [_logits(model, batch) for batch in batches]
    finally:
        for handle in handles:
            handle.remove()
    merged, kept = {}, {}
    for name, seen in routes.items():
        why = seen.why_not(threshold)
        if why is None:
            merged[name] = seen.expert
        else:
            kept[name] = why
    source = tracker.config.entropy_source
    if kept and merged and source != "precomputed":
        reason = f"entropy_source={source!r}: merging only some layers would change the base model's entropy"
        kept.update(dict.fromkeys(merged, reason))
        merged = {}
    if not merged:
        return MergeReport({}, kept, 0.0, unpatched=False)
    flags = {id(p): flag for p, flag in tracker.requires_grad_before}
    for name, expert in merged.items():
        _set_submodule(model, name, _merged_linear(layers[name], expert, flags))
    unpatched = not kept
    if unpatched:  # every adapted module is a plain nn.Linear now: hooks and tracker go
        model.requires_grad_(False)
        remove_alter(model)
    difference = max(float(((_logits(model, batch) - logits)[mask]).abs().max())
                     for batch, (logits, mask) in zip(batches, _with_masks(batches, before)))
    return MergeReport(merged, kept, difference, unpatched)


class _Routes:
    """The routes one layer gave the data's tokens: its lowest top gate and its top experts."""

    def __init__(self):
        self.lowest_gate, self.experts = 1.0, set()

    def hook(self, layer: AsymLoRALinear, args, output) -> None:
        state = layer.tracker.call_state()
        if not state.adapters_enabled:  # the prepass
            return
        with torch.no_grad():
            tokens = args[0].reshape(-1, layer.in_features)
            entropy = layer.tracker.token_entropy(state, tokens.shape[0], tokens.device)
            logits = layer.router(tokens, entropy)
            k, tau = routing_constants(state, entropy, layer.tracker.config, logits.dtype)
            top_gate, top_expert = dense_gate(logits, k, tau).max(dim=1)
        self.lowest_gate = min(self.lowest_gate, float(top_gate.min()))
        self.experts.update(top_expert.unique().tolist())

    @property
    def expert(self) -> int:
        return next(iter(self.experts))

    def why_not(self, threshold: float) -> str | None:
        if len(self.experts) > 1:
            return f"tokens go to experts {sorted(self.experts)}"
        if self.lowest_gate < threshold:
            return f"the lowest gate is {self.lowest_gate:.6g} < {threshold}"
        return None


def _merged_linear(layer: AsymLoRALinear, expert: int, flags: dict) -> nn.Linear:
    """nn.Linear with weight W0 + s·B_e A (float64, stored in W0's dtype) and W0's bias."""
    base = layer.base_layer
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        delta = layer.scaling * layer.lora_B[expert].double() @ layer.lora_A.double()
        merged.weight.copy_(base.weight.double() + delta)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    for new, old in zip(merged.parameters(), base.parameters()):
        new.requires_grad_(flags.get(id(old), False))
    return merged


def _batches(data) -> list[dict]:
    """``data`` as a list of model-input dicts, each with ``input_ids`` [B, L]."""
    items = data if isinstance(data, (list, tuple)) else [data]
    batches = []
    for item in items:
        batch = {"input_ids": item} if isinstance(item, torch.Tensor) else item
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                "merge_adapters: data must be token ids [B, L], a dict with input_ids [B, L] (and optionally "
                f"attention_mask), or a list of these; got {type(item).__name__}"
            )
        batches.append(batch)
    if not batches:
        raise ValueError("merge_adapters: data is empty; the routes must be seen on some tokens")
    return batches


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with evaluating(model):
        return model(**batch, use_cache=False).logits.double()


def _with_masks(batches, before):
    """(logits before merging, the positions that count [B, L] bool) per batch."""
    for batch, logits in zip(batches, before):
        mask = batch.get("attention_mask")
        mask = torch.ones(logits.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        yield logits, mask.to(logits.device)
