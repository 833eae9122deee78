"""ALTER: asymmetric LoRA for token-entropy-guided unlearning of LLMs.

Public names are imported lazily so that ``import alter`` stays light (the CLI, data and
evaluation helpers do not pay for each other's imports).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # configuration, layers, patching
    "AlterConfig": "alter.config",
    "AsymLoRALinear": "alter.layers",
    "EntropyTracker": "alter.tracker",
    "apply_alter": "alter.model",
    "remove_alter": "alter.model",
    "save_adapter": "alter.model",
    "load_adapter": "alter.model",
    "forced_route": "alter.model",
    "router_loss": "alter.model",
    "disable_adapters": "alter.model",
    "precomputed_entropy": "alter.model",
    "adapter_parameters": "alter.model",
    "alter_layers": "alter.model",
    "is_patched": "alter.model",
    "AlterRouter": "alter.layers",
    # training
    "unlearn": "alter.train",
    "finetune": "alter.train",
    "split_subdomains": "alter.train",
    "UnlearnReport": "alter.train",
    "mark_routing_targets": "alter.train",
    "routing_shares": "alter.train",
    # quality suite
    "Scenario": "alter.scenarios",
    "DEVELOPMENT": "alter.scenarios",
    "HELD_OUT": "alter.scenarios",
    "build_scenario": "alter.scenarios",
    "fact_token_mask": "alter.scenarios",
    "fact_accuracy": "alter.quality",
    "run_pair": "alter.quality",
    "run_suite": "alter.quality",
    # data
    "tofu_mini": "alter.data",
    "qa_texts": "alter.data",
    "format_qa": "alter.data",
    "format_mcq": "alter.data",
    "PromptFormat": "alter.data",
    "encode_qa": "alter.data",
    "collate": "alter.data",
    "load_tofu": "alter.data",
    "load_wmdp": "alter.data",
    "load_wmdp_corpus": "alter.data",
    "load_muse": "alter.data",
    "load_mmlu": "alter.data",
    "build_tokenizer": "alter.tiny",
    "tiny_llama": "alter.tiny",
    # evaluation
    "evaluate_tofu": "alter.eval",
    "truth_ratio": "alter.eval",
    "answer_probability": "alter.eval",
    "rouge_l_recall": "alter.eval",
    "forget_quality": "alter.eval",
    "model_utility": "alter.eval",
    "mcq_accuracy": "alter.eval",
    "verbmem_rouge": "alter.eval",
    "knowmem_rouge": "alter.eval",
    "knowmem_prompt": "alter.eval",
    "generate": "alter.eval",
    "mia_scores": "alter.eval",
    "mia_auc": "alter.eval",
    "privleak": "alter.eval",
    "extraction_strength": "alter.eval",
    "exact_memorization": "alter.eval",
    "evaluate_muse": "alter.eval",
    "open_unlearning_summary": "alter.eval",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alter' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
