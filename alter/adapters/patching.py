"""Patching Hugging Face causal LMs with ALTER adapters, and what is done to a patched
model: forced routing and its router loss, the adapter switch, entropy given by the
caller, optimiser parameter groups (adapter files: :mod:`alter.adapters.io`).

    model = apply_alter(model, AlterConfig(num_experts=4))
    with forced_route(model, experts):            # experts [B]: one expert per sample
        out = model(input_ids=ids, attention_mask=mask)
        loss = task_loss(out.logits) + router_loss(model)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from alter.adapters.layers import AsymLoRALinear
from alter.adapters.state import EntropyTracker
from alter.config import DEFAULT_TARGET_MODULES, EARLIER_DEFAULT_TARGET_MODULES, AlterConfig


def apply_alter(model: nn.Module, config: AlterConfig | None = None) -> nn.Module:
    """Adapt ``model`` in place and return it.

    Each ``nn.Linear`` whose attribute name (or dotted path suffix) is in
    ``config.target_modules`` is replaced by an :class:`AsymLoRALinear` wrapping it. All
    other parameters are frozen, so only lora_A, lora_B and the routers train. The
    model gets ``alter_config`` and ``alter_tracker`` (an :class:`EntropyTracker` whose
    hooks fill each forward's token entropy). Its ``save_pretrained`` raises until
    :func:`remove_alter`: the checkpoint it would write names the adapted modules'
    weights ``<path>.base_layer.weight``, which a plain ``from_pretrained`` does not
    read (it would load a randomly initialized model); :func:`alter.adapters.save_adapter`
    saves the adapter.

    Every name of a user-given ``target_modules`` must match a linear module (a typo
    raises ValueError listing the unmatched names and the model's linear modules). The
    default list names the modules of several architectures (Llama's ``q_proj``...,
    Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``...), so with it only one match in
    all is required. The output embedding (``lm_head``: the entropy is read from its
    logits) and the projections inside an ``nn.MultiheadAttention`` (which reads their
    weights directly) are never adapted.
    """
    config = AlterConfig() if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_alter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AlterConfig):
        raise TypeError(f"apply_alter: config must be an AlterConfig, got {type(config).__name__}")
    if is_patched(model):
        raise ValueError("apply_alter: the model already has ALTER adapters; call remove_alter(model) first")
    _check_key_vocabulary(model, config)
    linear = _adaptable_linear(model)
    targets = [(name, module) for name, module in linear if _matches(name, config.target_modules)]
    unmatched = [t for t in config.target_modules if not any(_matches(name, [t]) for name, _ in linear)]
    default = set(config.target_modules) in [set(d) for d in (DEFAULT_TARGET_MODULES, *EARLIER_DEFAULT_TARGET_MODULES)]
    if not targets or (unmatched and not default):
        what = f"no nn.Linear module of {type(model).__name__} matches target_modules {config.target_modules}"
        if targets:
            what = f"target_modules {unmatched} match no nn.Linear module of {type(model).__name__}"
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in linear})
        have = f"its linear modules are named {names}" if names else "it has no nn.Linear module to adapt"
        raise ValueError(f"apply_alter: {what}; {have} (the output embedding is never adapted){_conv1d_note(model)}")
    tracker = EntropyTracker(config)
    tracker.requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for name, linear in targets:
        _set_submodule(model, name, AsymLoRALinear(linear, config, tracker))
    tracker.attach(model)
    model.alter_config = config
    model.alter_tracker = tracker
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _RefusedSavePretrained(type(model).__name__)
    return model


def _check_key_vocabulary(model: nn.Module, config: AlterConfig) -> None:
    """ValueError when a route key holds a token id the model's embedding does not have
    (keys found with another tokenizer: an adapter saved for another model)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embedding, "num_embeddings", None)
    if vocabulary is None:
        return
    outside = [key for key in config.route_keys if max(key["tokens"]) >= vocabulary]
    if outside:
        raise ValueError(f"apply_alter: {len(outside)} route_keys hold token ids outside the model's vocabulary of "
                         f"{vocabulary} tokens (first: {outside[0]}); the keys were found with another tokenizer")


def remove_alter(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_alter`: put the original ``nn.Linear`` modules back (the same
    objects), remove the hooks, the tracker and the config, restore ``requires_grad``."""
    tracker = _tracker(model, "remove_alter")
    for name, layer in alter_layers(model).items():
        _set_submodule(model, name, layer.base_layer)
    tracker.detach()
    for param, requires_grad in tracker.requires_grad_before:
        param.requires_grad_(requires_grad)
    del model.alter_tracker
    del model.alter_config
    if isinstance(vars(model).get("save_pretrained"), _RefusedSavePretrained):
        del model.save_pretrained  # the class's own again
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries ALTER adapters (from :func:`apply_alter`)."""
    return isinstance(getattr(model, "alter_tracker", None), EntropyTracker)


def alter_layers(model: nn.Module) -> dict[str, AsymLoRALinear]:
    """The adapted layers of ``model`` by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AsymLoRALinear)}


def adapter_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable adapter parameters by optimiser group.

    ``"A"``: the shared lora_A matrices (train at ``config.lr_A``); ``"B"``: the expert
    lora_B tensors (``config.lr_B``); ``"router"``: router weights and entropy weights
    (the trainer decides their rate; ``lr_B`` is the natural choice).
    """
    _tracker(model, "adapter_parameters")
    layers = alter_layers(model).values()
    return {
        "A": [layer.lora_A for layer in layers],
        "B": [layer.lora_B for layer in layers],
        "router": [p for layer in layers for p in layer.router.parameters()],
    }


@contextlib.contextmanager
def forced_route(model: nn.Module, experts, gate: bool = True):
    """Context: every token of sample i goes to expert ``experts[i]`` with weight 1.

    experts: [B] integers in [0, num_experts) (a tensor or a sequence), B the batch of
    the forwards run inside. The router logits of those forwards are recorded for
    :func:`router_loss`. With ``gate=False`` the routes are not forced (the router gates
    as at inference) and ``experts`` are only router_loss's targets. Each forward keeps
    the routes it started with: a checkpointed recompute during a later ``backward``,
    inside or outside the context, sees them again.
    """
    with _tracker(model, "forced_route").forced(experts, gate):
        yield


def router_loss(model: nn.Module, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the router logits of the last forward against its forced experts,
    averaged over non-padding tokens and over layers (a scalar with gradient to the routers).
    ``token_mask`` ([B, L] bool, optional): only these tokens count (e.g. answer tokens)."""
    last_call = _tracker(model, "router_loss").last_call
    records = {} if last_call is None else last_call.router_records
    if not records:
        raise RuntimeError(
            "router_loss: no router logits were recorded; run a forward inside forced_route(model, experts) first"
        )
    if torch.is_grad_enabled() and any(
        layer.router.weight.requires_grad and not logits.requires_grad for layer, (logits, _, _) in records.items()
    ):
        raise RuntimeError(
            "router_loss: the last forward recorded its router logits without gradients while the routers train "
            "(reentrant gradient checkpointing runs the forward under no_grad); use non-reentrant checkpointing, "
            "model.activation_checkpointing_enable({'use_reentrant': False}), the Hugging Face default"
        )
    if token_mask is not None:
        first_logits, first_experts, _ = next(iter(records.values()))
        if token_mask.numel() != first_experts.numel():
            raise ValueError(
                f"router_loss: token_mask has {token_mask.numel()} tokens (shape {tuple(token_mask.shape)}) "
                f"but the last forward had {first_experts.numel()}"
            )
        # One copy to the layers' device, not one per layer.
        token_mask = token_mask.reshape(-1).to(device=first_logits.device, dtype=torch.bool)
    losses = []
    for logits, experts, mask in records.values():  # per layer: the mean over its (kept) tokens
        if token_mask is not None:
            keep = token_mask.to(logits.device)
            mask = keep if mask is None else mask & keep
        per_token = F.cross_entropy(logits.float(), experts, reduction="none")
        if mask is None:
            losses.append(per_token.mean())
        else:
            losses.append((per_token * mask).sum() / mask.sum().clamp_min(1))
    return torch.stack(losses).mean()


@contextlib.contextmanager
def frozen_adapters(model: nn.Module, experts=None):
    """Context: forwards inside give a zero gradient to the B of ``experts`` (expert ids),
    or with ``experts=None`` to every lora_A and lora_B (the routers still train). Values do
    not change, and each forward keeps the setting it started with, so one loss can sum
    forwards that train different parameters."""
    with _tracker(model, "frozen_adapters").frozen(experts):
        yield


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context: the model computes exactly the base model (adapters off)."""
    with _tracker(model, "disable_adapters").adapters_disabled():
        yield


@contextlib.contextmanager
def precomputed_entropy(model: nn.Module, entropy: torch.Tensor):
    """Context: forwards inside use ``entropy`` [B, L] (the input's shape) as the token
    entropy, whatever ``entropy_source`` is; a different input shape raises ValueError."""
    with _tracker(model, "precomputed_entropy").precomputed(entropy):
        yield


# --- helpers -----------------------------------------------------------------------------


def _tracker(model: nn.Module, caller: str) -> EntropyTracker:
    if not is_patched(model):
        raise ValueError(f"{caller}: the model has no ALTER adapters; call apply_alter(model, config) first")
    return model.alter_tracker


class _RefusedSavePretrained:
    """A patched model's ``save_pretrained`` (an instance attribute, so it copies and
    pickles with the model): raises ValueError naming the ways to save it."""

    def __init__(self, model_class: str):
        self.model_class = model_class

    def __call__(self, *args, **kwargs):
        raise ValueError(
            f"save_pretrained: this {self.model_class} carries ALTER adapters, and its checkpoint would name the "
            f"adapted weights '<module>.base_layer.weight' and 'lora_A'/'lora_B', which from_pretrained does not "
            f"read (it would load a randomly initialized model). Save the adapter with alter.save_adapter(model, "
            f"directory) and load it into the base model with alter.load_adapter(base_model, directory); for a "
            f"plain model, alter.remove_alter(model) gives the base model back (without the adapters) and "
            f"alter.merge_adapters(model, data) merges the adapters into it where their routes allow "
            f"(MergeReport.unpatched: every layer merged)"
        )


def _adaptable_linear(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` that an adapter may wrap, by path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and id(module) not in inside_attention
    ]


def _conv1d_note(model: nn.Module) -> str:
    """Why a model whose projections are transformers' ``Conv1D`` (GPT-2's) has no target:
    the end of apply_alter's error, or "" for a model without them."""
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Conv1D)})
    if not names:
        return ""
    return (f". Its projections {names} are transformers Conv1D modules (weight [in, out]), which AsymLoRA does "
            f"not adapt: it wraps nn.Linear only. Use a model whose projections are nn.Linear (Llama, Qwen2, "
            f"GPT-NeoX, ...), or replace each Conv1D by an nn.Linear holding its weight transposed before apply_alter")


def _matches(path: str, target_modules: list[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
