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
import dataclasses
import hashlib
import json
import os
import warnings

import torch
from torch import nn

from alter.config import ADAPTER_CONFIG_NAME, BASE_MODEL_KEY, DEFAULT_TARGET_MODULES, AlterConfig, read_json
from alter.files import staged_directory
from alter.layers import AsymLoRALinear
from alter.tracker import EntropyTracker

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Tensors saved per adapted module, as "<module path>.<suffix>".
ADAPTER_TENSOR_SUFFIXES = ("lora_A", "lora_B", "router.weight", "router.entropy_weight")
# The one safetensors metadata entry of save_adapter: JSON of the config the weights were
# trained with ("config") and a digest of the tensors ("sha256"), so that a corrupted or
# mismatched file is refused at load. One entry: safetensors writes a metadata map in a
# per-process random order, and the file's bytes must not depend on the process.
METADATA_KEY = "alter"
# Config fields that AsymLoRALinear fixes when a model is patched (beside r and
# num_experts, which the tensor shapes check): an adapter saved with other values cannot
# run in that model.
_PATCH_TIME_FIELDS = ("alpha", "dropout")


def apply_alter(model: nn.Module, config: AlterConfig | None = None) -> nn.Module:
    """Adapt ``model`` in place and return it.

    Each ``nn.Linear`` whose attribute name (or dotted path suffix) is in
    ``config.target_modules`` is replaced by an :class:`AsymLoRALinear` wrapping it. All
    other parameters are frozen, so only lora_A, lora_B and the routers train. The
    model gets ``alter_config`` and ``alter_tracker`` (an :class:`EntropyTracker` whose
    hooks fill each forward's token entropy).

    Every name of a user-given ``target_modules`` must match a linear module (a typo
    raises ValueError listing the unmatched names and the model's linear modules). The
    default list names the modules of several architectures (Llama's ``q_proj``...,
    Phi-3's ``qkv_proj``...), so with it only one match in all is required.
    """
    config = AlterConfig() if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_alter: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AlterConfig):
        raise TypeError(f"apply_alter: config must be an AlterConfig, got {type(config).__name__}")
    if is_patched(model):
        raise ValueError("apply_alter: the model already has ALTER adapters; call remove_alter(model) first")
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = [(name, module) for name, module in linear if _matches(name, config.target_modules)]
    unmatched = [t for t in config.target_modules if not any(_matches(name, [t]) for name, _ in linear)]
    if not targets or (unmatched and set(config.target_modules) != set(DEFAULT_TARGET_MODULES)):
        what = f"no nn.Linear module of {type(model).__name__} matches target_modules {config.target_modules}"
        if targets:
            what = f"target_modules {unmatched} match no nn.Linear module of {type(model).__name__}"
        raise ValueError(f"apply_alter: {what}; its linear modules are named "
                         f"{sorted({name.rsplit('.', 1)[-1] for name, _ in linear})}")
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
    return _tracker(model, "router_loss").router_loss(token_mask)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context: the model computes exactly the base model (adapters off)."""
    with _tracker(model, "disable_adapters").adapters_disabled():
        yield


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """No gradients and eval mode (no dropout), restoring the model's mode afterwards."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def precomputed_entropy(model: nn.Module, entropy: torch.Tensor):
    """Context: forwards inside use ``entropy`` [B, L] (the input's shape) as the token
    entropy, whatever ``entropy_source`` is; a different input shape raises ValueError."""
    with _tracker(model, "precomputed_entropy").precomputed(entropy):
        yield


def save_adapter(model: nn.Module, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

    Tensor keys are ``<module path>.lora_A``, ``.lora_B``, ``.router.weight`` and
    ``.router.entropy_weight``; the config records the base model's type and hidden size.
    The safetensors metadata holds the config and a SHA-256 of the tensors, which
    :func:`load_adapter` checks. Both files are written into a temporary sibling
    directory and moved in only when complete: a failed save (a full disk) leaves the
    previous adapter in ``directory`` as it was. ``state_dict``: the model's full tensors
    by name, read instead of the layers' own (a distributed run's shards).
    """
    from safetensors.torch import save_file

    _tracker(model, "save_adapter")

    def tensor(name: str, layer, suffix: str) -> torch.Tensor:
        value = layer.get_parameter(suffix) if state_dict is None else state_dict[f"{name}.{suffix}"]
        return value.detach().contiguous().cpu()

    tensors = {
        f"{name}.{suffix}": tensor(name, layer, suffix)
        for name, layer in alter_layers(model).items()
        for suffix in ADAPTER_TENSOR_SUFFIXES
    }
    config = model.alter_config
    metadata = {METADATA_KEY: json.dumps({"config": config.to_dict(), "sha256": _tensor_digest(tensors)}, sort_keys=True)}
    with staged_directory(directory) as staging:
        config.save_pretrained(staging, base_model=_base_model_record(model))
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata=metadata)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return it.

    An unpatched model is first patched with the saved config (and left unpatched again
    if the adapter does not fit). A patched model must have the same adapted modules and
    shapes, and the same alpha and dropout; it then adopts the saved config's routing and
    entropy settings (k_high, tau, entropy_source, ...; only its ``backend`` is kept),
    with a warning naming what changed, so the adapter never runs under settings it was
    not trained with. A mismatch (model type, hidden size, a missing or extra module, a
    tensor shape, i.e. rank or num_experts), an unreadable or corrupted file, or an
    ``adapter_config.json`` that does not match the config stored with the weights raises
    ValueError naming it, and leaves the model as it was.
    """
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapter: {path} does not exist")
    try:
        saved_config = AlterConfig.from_pretrained(directory)
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"load_adapter: {config_path} is not a valid adapter config: {exc}") from exc
    _check_base_model(model, read_json(config_path).get(BASE_MODEL_KEY), directory)
    tensors = _read_adapter_weights(weights_path, saved_config)
    patched_here = not is_patched(model)
    if patched_here:
        apply_alter(model, saved_config)
    else:
        _check_patch_time_fields(model.alter_config, saved_config, directory)
    try:
        _copy_adapter_tensors(model, tensors, saved_config, weights_path)
    except Exception:
        if patched_here:
            remove_alter(model)
        raise
    if not patched_here:
        _adopt_config(model, saved_config, directory)
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
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"load_adapter: {BASE_MODEL_KEY!r} in {directory}/{ADAPTER_CONFIG_NAME} must be an object, "
                         f"got {saved!r}")
    current = _base_model_record(model)
    for key, value in current.items():
        if saved.get(key) is not None and value is not None and saved[key] != value:
            raise ValueError(
                f"load_adapter: the adapter in {directory} was saved for a model with {key}={saved[key]!r}, "
                f"this model has {key}={value!r}"
            )


def _tensor_digest(tensors: dict) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config_differences(have: AlterConfig, want: AlterConfig, skip=("backend",)) -> dict:
    """``{field: (have's value, want's value)}`` of the fields that differ."""
    return {
        f.name: (getattr(have, f.name), getattr(want, f.name))
        for f in dataclasses.fields(AlterConfig)
        if f.name not in skip and getattr(have, f.name) != getattr(want, f.name)
    }


def _read_adapter_weights(path: str, config: AlterConfig) -> dict:
    """The tensors of an adapter weights file, checked against the digest and the config
    stored in its metadata (files from before they were stored are read unchecked)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file ({exc})") from exc
    if METADATA_KEY in metadata:
        try:
            saved = json.loads(metadata[METADATA_KEY])
            digest, trained = saved["sha256"], AlterConfig.from_dict(saved["config"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"load_adapter: {path} is corrupted: unreadable {METADATA_KEY!r} metadata ({exc!r})") from exc
        if digest != _tensor_digest(tensors):
            raise ValueError(f"load_adapter: {path} is corrupted: its tensors do not match the checksum saved with them")
        changed = _config_differences(config, trained)
        if changed:
            shown = ", ".join(f"{k}={have!r} (trained with {want!r})" for k, (have, want) in changed.items())
            raise ValueError(
                f"load_adapter: {ADAPTER_CONFIG_NAME} next to {path} does not match the config the weights were "
                f"saved with: {shown}"
            )
    return tensors


def _check_patch_time_fields(current: AlterConfig, saved: AlterConfig, directory) -> None:
    changed = {k: v for k, v in _config_differences(current, saved).items() if k in _PATCH_TIME_FIELDS}
    if changed:
        shown = ", ".join(f"{k}={have!r}, the adapter {k}={want!r}" for k, (have, want) in changed.items())
        raise ValueError(
            f"load_adapter: the model is patched with {shown} (in {directory}); these are fixed when the model is "
            "patched: load the adapter into an unpatched model (remove_alter(model) first)"
        )


def _adopt_config(model: nn.Module, saved: AlterConfig, directory) -> None:
    """Run a patched model under the config its new adapter was trained with (its backend kept)."""
    current = model.alter_config
    config = dataclasses.replace(saved, backend=current.backend)
    changed = _config_differences(current, config)
    if changed:
        shown = ", ".join(f"{k}: {have!r} -> {want!r}" for k, (have, want) in changed.items())
        warnings.warn(f"load_adapter: the model now uses the settings the adapter in {directory} was trained with "
                      f"({shown})", stacklevel=3)
    # In place: the model, its tracker and its layers share this one config object.
    for field in dataclasses.fields(AlterConfig):
        setattr(current, field.name, getattr(config, field.name))


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
