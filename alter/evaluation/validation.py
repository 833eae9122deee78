"""Argument checks shared by the evaluation protocols. Each takes ``fn``, the public
function checking its input, and names it in the error message."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def check_texts(fn: str, name: str, values) -> list[str]:
    """``values`` as a list of strings; a bare string (a sequence of characters) raises."""
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{fn}: {name} must be a sequence of strings")
    return list(values)


def check_pairs(fn: str, questions, answers) -> tuple[list[str], list[str]]:
    """Non-empty, equally long lists of question and answer strings."""
    questions, answers = check_texts(fn, "questions", questions), check_texts(fn, "answers", answers)
    if len(questions) != len(answers):
        raise ValueError(f"{fn}: questions and answers differ in length ({len(questions)} vs {len(answers)})")
    if not questions:
        raise ValueError(f"{fn}: questions is empty")
    return questions, answers


def check_columns(fn: str, dataset, columns: Sequence[str], what: str = "dataset") -> None:
    """A non-empty ``datasets.Dataset`` with every one of ``columns``."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{fn}: {what} lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{fn}: {what} is empty")


def check_samples(fn: str, name: str, values, allow_inf: bool = False) -> np.ndarray:
    """``values`` as a non-empty float64 ``[n]`` array without NaN (nor infinities unless
    ``allow_inf``)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if np.isnan(array).any() or (not allow_inf and np.isinf(array).any()):
        raise ValueError(f"{fn}: {name} contains NaN{'' if allow_inf else ' or infinite'} values")
    return array


def check_scored(fn: str, stats_list: list[dict], texts: Sequence[str]) -> None:
    """Every :func:`alter.evaluation.scoring.token_statistics` entry has a token to score
    besides the final EOS."""
    for i, st in enumerate(stats_list):
        if len(st["token_logp"]) == 0:
            raise ValueError(f"{fn}: text {i} ({texts[i]!r:.80}) has no tokens to score")
