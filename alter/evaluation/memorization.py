"""Memorization of answers under teacher forcing, as open-unlearning computes it:
extraction strength and exact memorization, from the greedy predictions of
:func:`alter.evaluation.scoring.token_statistics`."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from alter.data import PromptFormat, encode_qa, prompt_format_of
from alter.evaluation.scoring import context_length, token_statistics
from alter.evaluation.validation import check_pairs, check_scored


def answer_token_statistics(fn: str, model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                            batch_size: int, prompt_format: str | PromptFormat | None) -> list[dict]:
    """:func:`~alter.evaluation.scoring.token_statistics` of each answer (and EOS) given its
    question prompted by ``prompt_format``; an answer without tokens raises ``ValueError``."""
    questions, answers = check_pairs(fn, questions, answers)
    fmt = prompt_format_of(prompt_format)
    encoded = [encode_qa(tokenizer, q, a, context_length(model), fmt) for q, a in zip(questions, answers)]
    stats_list = token_statistics(model, tokenizer, encoded, batch_size, fn)
    check_scored(fn, stats_list, answers)
    return stats_list


def memorization_scores(stats_list: list[dict]) -> dict[str, np.ndarray]:
    """``extraction_strength`` and ``exact_memorization`` (float64 ``[n]`` each) of the
    :func:`answer_token_statistics` of ``n`` answers."""
    strength, exact = [], []
    for st in stats_list:
        match, n = st["match"], len(st["match"])
        # Suffix match of length n - k: all greedy predictions from k on are right.
        suffix_ok = np.flip(np.cumprod(np.flip(match)))
        k = int(np.argmax(suffix_ok)) if suffix_ok.any() else n - 1
        strength.append(1.0 - k / n)
        exact.append(match.mean())
    return {"extraction_strength": np.array(strength, dtype=np.float64),
            "exact_memorization": np.array(exact, dtype=np.float64)}


def extraction_strength(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                        batch_size: int = 16, prompt_format: str | PromptFormat | None = None) -> np.ndarray:
    """Extraction strength of each answer (float64 ``[n]``), as open-unlearning computes it:
    ``ES = 1 - k* / n`` over the answer's ``n`` tokens without EOS, ``k*`` the smallest ``k``
    in ``0 .. n-1`` such that greedy teacher-forced predictions get every token from ``k`` on
    right (``argmax p(. | q, y_<t) = y_t`` for all ``t >= k``), and ``k* = n - 1`` when none
    does: an answer whose last token is missed scores ``1/n``, as in open-unlearning's code
    (its paper's formula, letting ``k`` reach ``n``, would give 0). 1: the whole answer is
    extracted from the question alone."""
    stats_list = answer_token_statistics("extraction_strength", model, tokenizer, questions, answers, batch_size,
                                         prompt_format)
    return memorization_scores(stats_list)["extraction_strength"]


def exact_memorization(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                       batch_size: int = 16, prompt_format: str | PromptFormat | None = None) -> np.ndarray:
    """Exact memorization of each answer (float64 ``[n]``), as open-unlearning computes it:
    ``EM = (1/n) sum_t [argmax p(. | q, y_<t) = y_t]``, the fraction of the answer's ``n``
    tokens (without EOS) that greedy teacher-forced prediction gets right."""
    stats_list = answer_token_statistics("exact_memorization", model, tokenizer, questions, answers, batch_size,
                                         prompt_format)
    return memorization_scores(stats_list)["exact_memorization"]
