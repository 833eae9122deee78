"""Evaluation of unlearning: TOFU metrics, multiple-choice accuracy (WMDP, MMLU), MUSE
memorization, membership inference and extraction metrics (definitions in
``shared/DATASETS.md``; each function cites its formula), in the settings of TOFU,
open-unlearning, MUSE and lm-evaluation-harness (prompt formats, generation length, stop
strings, stemming), with open-unlearning's metric names for its summary layout.

Every function takes any causal LM that ``model(input_ids=..., attention_mask=...)``
answers with logits (an ALTER-patched model included) and its tokenizer; generation uses
``model.generate`` (greedy). Statistics come from ``scipy.stats`` and ROUGE from
``rouge_score``. Per-example results are float64 numpy arrays.

One module per protocol: ``tofu`` (answer probability, truth ratio, forget quality, model
utility, :func:`evaluate_tofu`), ``summary`` (open-unlearning's layout), ``own_data``
(the user's own forget/retain files, :func:`evaluate_own_data`), ``mia``
(membership inference, PrivLeak), ``memorization`` (extraction strength, exact
memorization), ``mcq`` (WMDP, MMLU), ``muse``, ``generation`` (greedy answers, ROUGE-L),
``facts`` (the quality suite's fact metrics against an oracle model);
all score through the one teacher-forced pass of ``scoring``; ``validation`` checks
their arguments.
"""
from alter.evaluation.facts import (fact_accuracy, fact_forget_quality, fact_mia_auc, fact_scores,
                                    generation_hit_rate, generation_rates, values_by_kind)
from alter.evaluation.generation import generate, rouge_l_recall
from alter.evaluation.mcq import mcq_accuracy
from alter.evaluation.memorization import exact_memorization, extraction_strength
from alter.evaluation.mia import MIA_ATTACKS, mia_auc, mia_scores, privleak
from alter.evaluation.own_data import OWN_DATA_GLOSSARY, evaluate_own_data
from alter.evaluation.muse import KNOWMEM_STOP, evaluate_muse, knowmem_prompt, knowmem_rouge, verbmem_rouge
from alter.evaluation.summary import open_unlearning_summary
from alter.evaluation.tofu import (UTILITY_KEYS, UTILITY_METRICS, UTILITY_SPLITS, answer_log_likelihood,
                                   answer_probability, evaluate_tofu, forget_quality, model_utility, truth_ratio,
                                   utility_components)

__all__ = [
    "MIA_ATTACKS", "KNOWMEM_STOP", "UTILITY_KEYS", "UTILITY_METRICS", "UTILITY_SPLITS",
    "OWN_DATA_GLOSSARY", "answer_log_likelihood", "answer_probability", "evaluate_muse", "evaluate_own_data",
    "evaluate_tofu", "exact_memorization", "extraction_strength", "fact_accuracy", "fact_forget_quality",
    "fact_mia_auc", "fact_scores", "forget_quality", "generate", "generation_hit_rate", "generation_rates",
    "knowmem_prompt",
    "knowmem_rouge", "mcq_accuracy",
    "mia_auc", "mia_scores", "model_utility", "open_unlearning_summary", "privleak", "rouge_l_recall",
    "truth_ratio", "utility_components", "values_by_kind", "verbmem_rouge",
]
