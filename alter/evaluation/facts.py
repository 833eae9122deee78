"""Fact-level metrics of the fictitious-knowledge scenarios (:mod:`alter.data.scenarios`),
measured against an oracle (the model trained the same way without the forget rows):

* :func:`fact_scores`: per fact, the summed log-probability of its value's tokens
  (teacher-forced) and how many of them the model predicts (argmax); one pass of
  :func:`alter.evaluation.scoring.labelled_logits`;
* :func:`fact_accuracy`: the micro-averaged argmax accuracy over fact-value tokens;
* :func:`fact_forget_quality`: the KS-test p-value between two models' per-fact value
  log-probabilities (TOFU's forget quality, applied to facts);
* :func:`fact_mia_auc`: loss-based membership inference of forgotten against never-seen
  facts (:func:`alter.evaluation.mia.mia_auc`);
* :func:`generation_hit_rate`: the share of facts whose value the model's greedy
  continuation of the fact's prompt contains (:func:`alter.evaluation.generation.generate`);
* :func:`generation_rates`: that and the share whose continuation names a value of the
  fact's kind, any entity's (a plausible answer, right or wrong).

Rows are scenario rows (``spans`` mark the values; :func:`alter.data.scenarios.generate_rows`).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from scipy import stats

from alter.data import IGNORE_INDEX
from alter.data.scenarios import fact_prompts, fact_token_spans
from alter.evaluation.generation import generate
from alter.evaluation.mia import mia_auc
from alter.evaluation.scoring import labelled_logits
from alter.evaluation.validation import check_samples


def fact_scores(model, tokenizer, rows: Sequence[dict], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per fact of ``rows`` (every span of every row, in order): ``logprob`` (float64
    ``[n]``, the sum over the value's tokens of ``log p(token | tokens before)``),
    ``tokens`` (int64 ``[n]``, the value's token count) and ``correct`` (int64 ``[n]``, how
    many of them are the argmax prediction). Eval mode, no gradients; one pass of
    :func:`alter.evaluation.scoring.labelled_logits` with the value tokens as labels."""
    if not rows:
        raise ValueError("fact_scores: rows is empty")
    encoded, value_owners, first_fact = [], [], [0]
    for row in rows:
        ids, owner = fact_token_spans(tokenizer, row)
        # The value tokens are the labels: scoring yields them (and their logits) in order.
        # The BOS (token 0) is never a value, and never a target.
        labels = [token if fact >= 0 and t > 0 else IGNORE_INDEX for t, (token, fact) in enumerate(zip(ids, owner))]
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        value_owners.append(np.asarray([fact for t, fact in enumerate(owner) if fact >= 0 and t > 0]))
        first_fact.append(first_fact[-1] + len(row["spans"]))
    n = first_fact[-1]
    logprob, tokens, correct = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i, logits, targets in labelled_logits(model, tokenizer, encoded, batch_size, "fact_scores"):
        logp = torch.log_softmax(logits, dim=-1)
        where = first_fact[i] + value_owners[i]
        np.add.at(logprob, where, logp.gather(1, targets[:, None])[:, 0].double().cpu().numpy())
        np.add.at(tokens, where, 1)
        np.add.at(correct, where, (logp.argmax(-1) == targets).cpu().numpy())
    if (tokens == 0).any():
        raise ValueError("fact_scores: a fact value covers no token (its span is empty or outside the text)")
    return {"logprob": logprob, "tokens": tokens, "correct": correct}


def fact_accuracy(model, tokenizer, rows: Sequence[dict], batch_size: int = 32) -> float:
    """Teacher-forced argmax accuracy over the fact-value tokens of ``rows``
    (micro-average over tokens), in eval mode without gradients."""
    scores = fact_scores(model, tokenizer, rows, batch_size)
    return float(scores["correct"].sum() / scores["tokens"].sum())


def fact_forget_quality(logprobs, oracle_logprobs) -> float:
    """The p-value of the two-sample KS test (``scipy.stats.ks_2samp``) between a model's
    and the oracle's per-fact value log-probabilities (float ``[n]`` and ``[m]``, from
    :func:`fact_scores`) on the forgotten facts. Near 1: the model is indistinguishable
    from one that never saw them; below 0.05: it still knows them (or forgot too much)."""
    samples = [check_samples("fact_forget_quality", name, values)
               for name, values in (("logprobs", logprobs), ("oracle_logprobs", oracle_logprobs))]
    return float(stats.ks_2samp(*samples).pvalue)


def fact_mia_auc(member_scores: dict, nonmember_scores: dict) -> float:
    """Loss-based membership-inference AUC (:func:`alter.evaluation.mia.mia_auc`) of the
    facts of ``member_scores`` (forgotten facts) against those of ``nonmember_scores``
    (facts no model saw), both :func:`fact_scores` results; a fact's loss is the mean NLL
    of its value's tokens. 0.5: the forgotten facts look never seen."""
    return mia_auc(*(-s["logprob"] / s["tokens"] for s in (member_scores, nonmember_scores)))


def _kinds(row: dict, op: str) -> list[str]:
    """A row's ``kinds``, one per fact (ValueError naming the row otherwise)."""
    kinds = row.get("kinds")
    if kinds is None or len(kinds) != len(row["spans"]):
        raise ValueError(f"{op}: row of {row.get('entity', '?')!r} needs kinds, one per fact (spans: "
                         f"{len(row['spans'])}, kinds: {kinds!r})")
    return list(kinds)


def values_by_kind(rows: Sequence[dict]) -> dict[str, set[str]]:
    """Every value each kind of fact takes in ``rows`` (rows with ``kinds``, one per span):
    ``{kind: {value, ...}}``."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for (_, value), kind in zip(fact_prompts(row), _kinds(row, "values_by_kind")):
            values.setdefault(kind, set()).add(value)
    return values


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _holds(words: list[str], phrase: list[str]) -> bool:
    """Whether ``phrase`` occurs in ``words`` as a run of whole words."""
    n = len(phrase)
    return n > 0 and any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def _without(words: list[str], phrase: list[str]) -> list[str]:
    """``words`` with every run equal to ``phrase`` taken out."""
    out, i, n = [], 0, len(phrase)
    while i < len(words):
        if n and words[i:i + n] == phrase:
            i += n
        else:
            out.append(words[i])
            i += 1
    return out


def generation_rates(model, tokenizer, rows: Sequence[dict], kind_values: dict[str, set[str]] | None = None,
                     max_new_tokens: int = 32, batch_size: int = 32) -> dict[str, float]:
    """From one greedy continuation (``max_new_tokens``) of each fact's prompt
    (:func:`alter.data.scenarios.fact_prompts`: a QA row's question, a text row's text
    up to the value): ``"hits"``, the share of the facts of ``rows`` whose continuation
    names the value, and with ``kind_values`` (:func:`values_by_kind`; the rows need
    ``kinds``) ``"plausible"``, the share whose continuation names a value of the fact's
    kind, its own or another entity's: a model that never saw an entity answers with a
    plausible wrong value, where a run that broke the answer babbles. "Names": as a run of
    whole words (case-insensitive; "194" is not in "1948"), once every mention of the
    row's entity is taken out (a restated name is no answer, even where a value of the
    kind is spelt like part of it)."""
    pairs = [pair for row in rows for pair in fact_prompts(row)]
    if not pairs:
        raise ValueError("generation_rates: rows hold no fact")
    if kind_values is not None:
        kinds = [kind for row in rows for kind in _kinds(row, "generation_rates")]
        missing = sorted(set(kinds) - set(kind_values))
        if missing:
            raise ValueError(f"generation_rates: kind_values has no values of the kinds {missing}")
    answers = generate(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens, batch_size)
    entities = [row.get("entity", "") for row in rows for _ in row["spans"]]
    said = [_without(_words(answer), _words(entity)) for answer, entity in zip(answers, entities)]
    rates = {"hits": float(np.mean([_holds(words, _words(value)) for (_, value), words in zip(pairs, said)]))}
    if kind_values is not None:
        phrases = {kind: [_words(value) for value in kind_values[kind]] for kind in set(kinds)}
        rates["plausible"] = float(np.mean([any(_holds(words, phrase) for phrase in phrases[kind])
                                            for kind, words in zip(kinds, said)]))
    return rates


def generation_hit_rate(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 32,
                        batch_size: int = 32) -> float:
    """Share of the facts of ``rows`` whose value occurs in the model's greedy continuation
    (``max_new_tokens``) of the fact's prompt (:func:`generation_rates`' ``"hits"``)."""
    return generation_rates(model, tokenizer, rows, None, max_new_tokens, batch_size)["hits"]
