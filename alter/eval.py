"""Moved to :mod:`alter.evaluation` (one module per protocol); this module re-exports its names."""
from alter.evaluation import (KNOWMEM_STOP, MIA_ATTACKS, UTILITY_KEYS, UTILITY_METRICS, UTILITY_SPLITS,  # noqa: F401
                              answer_log_likelihood, answer_probability, evaluate_muse, evaluate_tofu,
                              exact_memorization, extraction_strength, forget_quality, generate, knowmem_prompt,
                              knowmem_rouge, mcq_accuracy, mia_auc, mia_scores, model_utility,
                              open_unlearning_summary, privleak, rouge_l_recall, truth_ratio, utility_components,
                              verbmem_rouge)
