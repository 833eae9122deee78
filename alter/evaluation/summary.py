"""The metrics of :func:`alter.evaluation.tofu.evaluate_tofu` in open-unlearning's summary
layout (``TOFU_SUMMARY.json``)."""
from __future__ import annotations

from typing import Mapping

# open-unlearning's metric names (configs/eval/tofu_metrics) for this project's TOFU metrics.
_OPEN_UNLEARNING_TOFU_NAMES = {
    "forget_quality": "forget_quality",
    "model_utility": "model_utility",
    "forget_prob": "forget_Q_A_Prob",
    "forget_rouge": "forget_Q_A_ROUGE",
    "forget_truth_ratio": "forget_truth_ratio",
    "extraction_strength": "extraction_strength",
    "exact_memorization": "exact_memorization",
    "privleak": "privleak",
    **{f"mia_{attack}": f"mia_{attack}" for attack in ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")},
}
_OPEN_UNLEARNING_UTILITY_NAMES = {
    "retain_prob": "retain_Q_A_Prob", "retain_rouge": "retain_Q_A_ROUGE", "retain_truth_ratio": "retain_Truth_Ratio",
    "real_authors_prob": "ra_Q_A_Prob_normalised", "real_authors_rouge": "ra_Q_A_ROUGE",
    "real_authors_truth_ratio": "ra_Truth_Ratio",
    "world_facts_prob": "wf_Q_A_Prob_normalised", "world_facts_rouge": "wf_Q_A_ROUGE",
    "world_facts_truth_ratio": "wf_Truth_Ratio",
}


def open_unlearning_summary(metrics: Mapping) -> dict[str, float]:
    """The metrics of :func:`~alter.evaluation.tofu.evaluate_tofu` in open-unlearning's summary layout
    (``TOFU_SUMMARY.json``): a flat mapping from its metric names (``forget_quality``,
    ``model_utility``, ``forget_Q_A_Prob``, ``forget_Q_A_ROUGE``, ``forget_truth_ratio``,
    ``privleak``, ``extraction_strength``, ``exact_memorization``, ``mia_*`` and the nine
    utility components ``retain_Q_A_Prob`` ... ``wf_Truth_Ratio``) to their values, sorted
    by name; metrics that were not computed (None, e.g. forget quality without a retain
    model) are left out, as open-unlearning leaves them out."""
    if not isinstance(metrics, Mapping):
        raise TypeError("open_unlearning_summary: metrics must be the mapping evaluate_tofu returns")
    summary = {name: metrics[key] for key, name in _OPEN_UNLEARNING_TOFU_NAMES.items() if metrics.get(key) is not None}
    components = metrics.get("utility_components") or {}
    summary.update({name: components[key] for key, name in _OPEN_UNLEARNING_UTILITY_NAMES.items() if key in components})
    return dict(sorted(summary.items()))
