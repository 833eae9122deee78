"""The adapter core: AsymLoRA layers (:mod:`.layers`), the per-call state their model's
forwards build (:mod:`.state`, with the Hugging Face specifics in :mod:`.hooks`),
patching a model (:mod:`.patching`), adapter files (:mod:`.io`) and merging for serving
(:mod:`.merge`)."""
from alter.adapters.io import ADAPTER_TENSOR_SUFFIXES, ADAPTER_WEIGHTS_NAME, load_adapter, save_adapter
from alter.adapters.layers import AlterRouter, AsymLoRALinear
from alter.adapters.merge import MergeReport, merge_adapters
from alter.adapters.patching import (adapter_parameters, alter_layers, apply_alter, disable_adapters, forced_route,
                                     frozen_adapters, is_patched, precomputed_entropy, remove_alter, router_loss)
from alter.adapters.state import CallState, EntropyTracker, evaluating

__all__ = [
    "ADAPTER_TENSOR_SUFFIXES", "ADAPTER_WEIGHTS_NAME", "AlterRouter", "AsymLoRALinear", "CallState", "EntropyTracker",
    "MergeReport", "adapter_parameters", "alter_layers", "apply_alter", "disable_adapters", "evaluating", "forced_route",
    "frozen_adapters", "is_patched", "load_adapter", "merge_adapters", "precomputed_entropy", "remove_alter",
    "router_loss", "save_adapter",
]
