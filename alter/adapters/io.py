"""Adapter files: ``save_adapter`` writes ``adapter_config.json`` and
``adapter_model.safetensors``; ``load_adapter`` checks them against the model and loads.

    save_adapter(model, "adapter/")
    load_adapter(base_model, "adapter/")     # patches an unpatched model with the saved config
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

import torch
from torch import nn

from alter.adapters.patching import _tracker, alter_layers, apply_alter, is_patched, remove_alter
from alter.config import ADAPTER_CONFIG_NAME, BASE_MODEL_KEY, AlterConfig, read_json
from alter.files import staged_directory

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
        shown = ", ".join(f"{k}: {len(have)} -> {len(want)} keys" if k == "route_keys" else f"{k}: {have!r} -> {want!r}"
                          for k, (have, want) in changed.items())
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
