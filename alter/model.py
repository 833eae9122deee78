"""Patching Hugging Face causal LMs with ALTER adapters, and everything done to a patched
model: adapter save/load, forced routing and its router loss, adapter switch, entropy
given by the caller, optimiser parameter groups.

    model = apply_alter(model, AlterConfig(num_experts=4))
    with forced_route(model, experts):            # experts [B]: one expert per sample
        out = model(input_ids=ids, attention_mask=mask)
        loss = task_loss(out.logits) + router_loss(model)
    save_adapter(model, "adapter/")
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from alter.config import ADAPTER_CONFIG_NAME, BASE_MODEL_KEY, AlterConfig, read_json
from alter.layers import AsymLoRALinear
from alter.tracker import EntropyTracker

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Tensors saved per adapted module, as "<module path>.<suffix>".
ADAPTER_TENSOR_SUFFIXES = ("lora_A", "lora_B", "router.weight", "router.entropy_weight")


def apply_alter(model: nn.Module, config: AlterConfig | None = None) -> nn.Module:
    """Adapt ``model`` in place and return it.

    Each ``nn.Linear`` whose attribute name (or dotted path suffix) is in
    ``config.target_modules`` is replaced by an :class:`AsymLoRALinear` wrapping it. All
    other parameters are frozen, so only lora_A, lora_B and the routers train. The
    model gets ``alter_config`` and ``alter_tracker`` (an :class:`EntropyTracker` whose
    hooks fill each forward's token entropy).
    """
    config = AlterConfig() if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_alter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AlterConfig):
        raise TypeError(f"apply_alter: config must be an AlterConfig, got {type(config).__name__}")
    if is_patched(model):
        raise ValueError("apply_alter: the model already has ALTER adapters; call remove_alter(model) first")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, config.target_modules)
    ]
    if not targets:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"apply_alter: no nn.Linear module of {type(model).__name__} matches target_modules "
            f"{config.target_modules}; its linear modules are named {linear}"
        )
    tracker = EntropyTracker(config)
    tracker.requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for name, linear in targets:
        _set_submodule(model, name, AsymLoRALinear(linear, config, tracker))
    tracker.attach(model)
    model.alter_config = config
    model.alter_tracker = tracker
    return model


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
    as at inference) and ``experts`` are only router_loss's targets. With gradient
    checkpointing, call ``backward`` inside the context too: the recomputed forward must
    see the same routes.
    """
    with _tracker(model, "forced_route").forced(experts, gate):
        yield


def router_loss(model: nn.Module, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the router logits of the last forward against its forced experts,
    averaged over non-padding tokens and over layers (a scalar with gradient to the routers).
    ``token_mask`` ([B, L] bool, optional): only these tokens count (e.g. answer tokens)."""
    return _tracker(model, "router_loss").router_loss(token_mask)


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


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

    Tensor keys are ``<module path>.lora_A``, ``.lora_B``, ``.router.weight`` and
    ``.router.entropy_weight``; the config records the base model's type and hidden size.
    """
    from safetensors.torch import save_file

    _tracker(model, "save_adapter")
    tensors = {
        f"{name}.{suffix}": layer.get_parameter(suffix).detach().contiguous().cpu()
        for name, layer in alter_layers(model).items()
        for suffix in ADAPTER_TENSOR_SUFFIXES
    }
    model.alter_config.save_pretrained(directory, base_model=_base_model_record(model))
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return it.

    An unpatched model is first patched with the saved config (and left unpatched again
    if the adapter does not fit); a patched model keeps its own config and must have the
    same adapted modules and shapes. A mismatch (model type, hidden size, a missing or
    extra module, a tensor shape, i.e. rank or num_experts) raises ValueError naming it.
    """
    from safetensors.torch import load_file

    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapter: {path} does not exist")
    saved_config = AlterConfig.from_pretrained(directory)
    _check_base_model(model, read_json(config_path).get(BASE_MODEL_KEY), directory)
    tensors = load_file(weights_path)
    patched_here = not is_patched(model)
    if patched_here:
        apply_alter(model, saved_config)
    try:
        _copy_adapter_tensors(model, tensors, saved_config, weights_path)
    except Exception:
        if patched_here:
            remove_alter(model)
        raise
    return model


# --- helpers -----------------------------------------------------------------------------


def _tracker(model: nn.Module, caller: str) -> EntropyTracker:
    if not is_patched(model):
        raise ValueError(f"{caller}: the model has no ALTER adapters; call apply_alter(model, config) first")
    return model.alter_tracker


def _matches(path: str, target_modules: list[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _base_model_record(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None) or type(model).__name__,
        "hidden_size": getattr(config, "hidden_size", None),
    }


def _check_base_model(model: nn.Module, saved: dict | None, directory) -> None:
    if not saved:
        return
    current = _base_model_record(model)
    for key, value in current.items():
        if saved.get(key) is not None and value is not None and saved[key] != value:
            raise ValueError(
                f"load_adapter: the adapter in {directory} was saved for a model with {key}={saved[key]!r}, "
                f"this model has {key}={value!r}"
            )


def _module_of_key(key: str, path) -> str:
    for suffix in ADAPTER_TENSOR_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    raise ValueError(f"load_adapter: {path} holds {key!r}, which is not an ALTER adapter tensor")


def _copy_adapter_tensors(model: nn.Module, tensors: dict, saved: AlterConfig, path) -> None:
    """Check names and shapes of every saved tensor against ``model``, then copy them in."""
    layers = alter_layers(model)
    extra = sorted({_module_of_key(key, path) for key in tensors} - set(layers))
    if extra:
        raise ValueError(
            f"load_adapter: {path} has adapter weights for module {extra[0]!r}, which this model does not adapt"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    current = model.alter_config
    for name, layer in layers.items():
        for suffix in ADAPTER_TENSOR_SUFFIXES:
            key = f"{name}.{suffix}"
            if key not in tensors:
                raise ValueError(f"load_adapter: {path} has no tensor {key!r} for module {name!r}")
            have, want = tuple(tensors[key].shape), tuple(layer.get_parameter(suffix).shape)
            if have != want:
                raise ValueError(
                    f"load_adapter: module {name!r}: {suffix} has shape {list(have)} in {path} but "
                    f"{list(want)} in the model (adapter saved with r={saved.r}, num_experts={saved.num_experts}; "
                    f"the model has r={current.r}, num_experts={current.num_experts})"
                )
    with torch.no_grad():
        for name, layer in layers.items():
            for suffix in ADAPTER_TENSOR_SUFFIXES:
                param = layer.get_parameter(suffix)
                param.copy_(tensors[f"{name}.{suffix}"].to(device=param.device, dtype=param.dtype))
