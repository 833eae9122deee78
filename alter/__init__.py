"""ALTER: asymmetric LoRA for token-entropy-guided unlearning of LLMs.

Public names are imported lazily so that ``import alter`` stays light (the CLI, data and
evaluation helpers do not pay for each other's imports).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # configuration, layers, patching
    "AlterConfig": "alter.config",
    "AsymLoRALinear": "alter.adapters",
    "EntropyTracker": "alter.adapters",
    "CallState": "alter.adapters",
    "apply_alter": "alter.adapters",
    "remove_alter": "alter.adapters",
    "save_adapter": "alter.adapters",
    "load_adapter": "alter.adapters",
    "forced_route": "alter.adapters",
    "router_loss": "alter.adapters",
    "disable_adapters": "alter.adapters",
    "frozen_adapters": "alter.adapters",
    "precomputed_entropy": "alter.adapters",
    "adapter_parameters": "alter.adapters",
    "alter_layers": "alter.adapters",
    "is_patched": "alter.adapters",
    "AlterRouter": "alter.adapters",
    "merge_adapters": "alter.adapters",
    "MergeReport": "alter.adapters",
    # training
    "unlearn": "alter.training.loop",
    "finetune": "alter.training.finetune",
    "split_subdomains": "alter.methods.data",
    "UnlearnReport": "alter.training.report",
    "mark_routing_targets": "alter.methods.data",
    "routing_shares": "alter.training.report",
    # quality suite
    "Scenario": "alter.data.scenarios",
    "DEVELOPMENT": "alter.data.scenarios",
    "HELD_OUT": "alter.data.scenarios",
    "build_scenario": "alter.data.scenarios",
    "fact_token_mask": "alter.data.scenarios",
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
    "evaluate_tofu": "alter.evaluation",
    "evaluate_own_data": "alter.evaluation",
    "truth_ratio": "alter.evaluation",
    "answer_probability": "alter.evaluation",
    "rouge_l_recall": "alter.evaluation",
    "forget_quality": "alter.evaluation",
    "model_utility": "alter.evaluation",
    "mcq_accuracy": "alter.evaluation",
    "verbmem_rouge": "alter.evaluation",
    "knowmem_rouge": "alter.evaluation",
    "knowmem_prompt": "alter.evaluation",
    "generate": "alter.evaluation",
    "mia_scores": "alter.evaluation",
    "mia_auc": "alter.evaluation",
    "privleak": "alter.evaluation",
    "extraction_strength": "alter.evaluation",
    "exact_memorization": "alter.evaluation",
    "evaluate_muse": "alter.evaluation",
    "open_unlearning_summary": "alter.evaluation",
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
