"""The evaluation of a model on the user's own forget/retain data (the files ``alter
unlearn`` takes): :func:`evaluate_own_data`, built on the metric functions of the other
modules (nothing recomputed here).

Per row, QA rows (``question``/``answer``) score their answer given the question, text rows
(``text``) the whole text: answer probability (length-normalized, as TOFU), extraction
strength (open-unlearning) and ROUGE-L recall of the greedy answer (a text row: of the
continuation of its first half against its second half). The membership-inference attacks
tell the forget rows (members) from ``holdout`` rows when given, else from the retain rows.
Rows carrying ``paraphrased_answer`` and ``perturbed_answer`` add TOFU's truth ratio, and
with it forget quality (given a retain model's forget truth ratios) and model utility (the
harmonic mean of the retain split's three numbers, as TOFU's over its three splits).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from alter.data import encode_text, prompt_format_of
from alter.evaluation.generation import generate, rouge_l, rouge_l_recall
from alter.evaluation.memorization import answer_token_statistics, memorization_scores
from alter.evaluation.mia import all_mia_scores, mia_auc
from alter.evaluation.scoring import context_length, token_statistics
from alter.evaluation.tofu import forget_quality, model_utility, truth_ratio
from alter.evaluation.validation import check_scored

# What each key of evaluate_own_data's result means (alter eval prints the ones it shows).
OWN_DATA_GLOSSARY = {
    "rouge": "ROUGE-L recall of the model's greedy answer against the true one (text rows: of the continuation "
             "of the first half against the second half); 1 = word for word, lower after forgetting",
    "prob": "mean probability per answer token (text rows: per text token), length-normalized as TOFU; lower "
            "after forgetting",
    "extraction_strength": "share of the answer the model completes on its own from some point on "
                           "(open-unlearning); 1 = the whole answer comes out of the question alone",
    "mia": "membership-inference AUC of telling the forget rows (members) from the mia_nonmembers rows (holdout, "
           "else retain) by each attack's score; 1 = the forget rows look more like training data than those, "
           "0.5 = alike, below 0.5 = less (against retain: forgotten while retain is kept)",
    "truth_ratio": "TOFU's mean min(R, 1/R), R = P(perturbed answers) / P(paraphrased answer); near 1 = the "
                   "model cannot tell the truth from plausible falsehoods",
    "forget_quality": "KS-test p-value between this model's and a retain model's forget truth ratios "
                      "(--retain-metrics); high = indistinguishable from never having seen the forget set",
    "model_utility": "harmonic mean of retain prob, ROUGE and max(0, 1 - truth ratio) (TOFU's, over the retain "
                     "split only)",
}
_TOFU_COLUMNS = ("paraphrased_answer", "perturbed_answer")


def _kinds(dataset) -> list[bool]:
    """Whether each row is a QA row (a non-null ``question``), else a text row."""
    questions = dataset["question"] if "question" in dataset.column_names else [None] * len(dataset)
    return [q is not None for q in questions]


def _text_rouge(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int) -> np.ndarray:
    """ROUGE-L recall of the greedy continuation of each text's first half of words against the rest."""
    words = [t.split() for t in texts]
    halves = [max(1, len(w) // 2) for w in words]
    prompts = [" ".join(w[:h]) for w, h in zip(words, halves)]
    references = [" ".join(w[h:]) or " ".join(w) for w, h in zip(words, halves)]
    return rouge_l(generate(model, tokenizer, prompts, max_new_tokens, batch_size), references, "recall")


def _row_scores(model, tokenizer, dataset, batch_size, max_new_tokens, fmt, mia_k, bar) -> dict:
    """Per-row arrays (float64 ``[n]``, rows in file order) of prob, extraction strength and
    ROUGE, and the attacks' scores (``"mia"``: {attack: ``[n]``})."""
    is_qa = np.array(_kinds(dataset))
    order = np.concatenate([np.flatnonzero(is_qa), np.flatnonzero(~is_qa)])
    parts = []
    if is_qa.any():
        qa = dataset.select(np.flatnonzero(is_qa))
        questions, answers = list(qa["question"]), list(qa["answer"])
        bar.set_postfix_str("QA: teacher-forced pass")
        stats = answer_token_statistics("evaluate_own_data", model, tokenizer, questions, answers, batch_size, fmt)
        bar.set_postfix_str("QA: greedy answers")
        rouge = rouge_l_recall(model, tokenizer, questions, answers, max_new_tokens, batch_size, fmt)
        mia = all_mia_scores(model, tokenizer, answers, questions, fmt, mia_k, None, batch_size,
                             fn="evaluate_own_data", target_stats=stats)
        parts.append((stats, rouge, mia))
    if (~is_qa).any():
        texts = list(dataset.select(np.flatnonzero(~is_qa))["text"])
        bar.set_postfix_str("text: teacher-forced pass")
        encoded = [encode_text(tokenizer, t, context_length(model)) for t in texts]
        stats = token_statistics(model, tokenizer, encoded, batch_size, "evaluate_own_data")
        check_scored("evaluate_own_data", stats, texts)
        bar.set_postfix_str("text: greedy continuations")
        rouge = _text_rouge(model, tokenizer, texts, max_new_tokens, batch_size)
        mia = all_mia_scores(model, tokenizer, texts, None, None, mia_k, None, batch_size,
                             fn="evaluate_own_data", target_stats=stats)
        parts.append((stats, rouge, mia))
    stats = [st for part in parts for st in part[0]]
    unsorted = {
        "prob": np.exp([st["logp"].mean() for st in stats]),
        "extraction_strength": memorization_scores(stats)["extraction_strength"],
        "rouge": np.concatenate([part[1] for part in parts]),
        "mia": {attack: np.concatenate([part[2][attack] for part in parts]) for attack in parts[0][2]},
    }
    back = np.argsort(order)  # file order again
    return {key: ({a: v[back] for a, v in value.items()} if key == "mia" else value[back])
            for key, value in unsorted.items()}


def _has_tofu_columns(dataset) -> bool:
    return all(c in dataset.column_names and all(v is not None for v in dataset[c]) for c in _TOFU_COLUMNS) \
        and all(_kinds(dataset))


def evaluate_own_data(model, tokenizer, forget, retain=None, holdout=None, retain_model_truth_ratios=None,
                      batch_size: int = 16, max_new_tokens: int = 32, prompt_format=None, mia_k: float = 0.4,
                      progress: bool = True) -> dict:
    """The model's scores on the user's own data (module doc for each metric).

    ``forget``, ``retain``, ``holdout``: ``datasets.Dataset`` of QA rows (``question``,
    ``answer``) and/or text rows (``text``), as ``alter unlearn`` reads them; ``retain`` and
    ``holdout`` may be None. ``retain_model_truth_ratios``: a retain model's per-question
    forget truth ratios (``forget_truth_ratios`` of its result), for forget quality.
    ``progress``: a bar over the passes.

    Returns a dict: ``{split}_rouge``, ``{split}_prob``, ``{split}_extraction_strength``
    (means over the split's rows) for split forget and, when given, retain;
    ``mia_{attack}`` (:func:`~alter.evaluation.mia.mia_auc`, forget rows against
    ``mia_nonmembers``: ``"holdout"`` or ``"retain"``; absent with neither); where every
    row of forget (retain) carries ``paraphrased_answer`` and ``perturbed_answer``,
    ``forget_truth_ratio`` and ``forget_truth_ratios`` (per row), ``forget_quality`` (None
    without ``retain_model_truth_ratios``), ``retain_truth_ratio`` and ``model_utility``;
    ``glossary``: a line for each metric.
    """
    fmt = prompt_format_of(prompt_format)
    splits = {name: data for name, data in (("forget", forget), ("retain", retain), ("holdout", holdout))
              if data is not None}
    tofu = {name: _has_tofu_columns(data) for name, data in splits.items() if name != "holdout"}
    bar = tqdm(total=len(splits) + sum(tofu.values()), desc="alter eval", disable=not progress)
    scores, metrics = {}, {}
    try:
        for name, data in splits.items():
            bar.set_description(f"alter eval: {name}")
            scores[name] = _row_scores(model, tokenizer, data, batch_size, max_new_tokens, fmt, mia_k, bar)
            bar.update(1)
            if name == "holdout":
                continue
            for key in ("rouge", "prob", "extraction_strength"):
                metrics[f"{name}_{key}"] = float(scores[name][key].mean())
            if tofu[name]:
                bar.set_postfix_str("truth ratio")
                ratios = truth_ratio(model, tokenizer, data, "paraphrased_answer", batch_size, fmt)
                metrics[f"{name}_truth_ratio"] = float(np.minimum(ratios, 1.0 / ratios).mean())
                scores[name]["truth_ratio"] = ratios
                bar.update(1)
    finally:
        bar.close()
    nonmembers = "holdout" if holdout is not None else "retain" if retain is not None else None
    if nonmembers is not None:
        for attack, member_scores in scores["forget"]["mia"].items():
            metrics[f"mia_{attack}"] = mia_auc(member_scores, scores[nonmembers]["mia"][attack])
        metrics["mia_nonmembers"] = nonmembers
    if tofu["forget"]:
        ratios = scores["forget"]["truth_ratio"]
        metrics["forget_truth_ratios"] = ratios.tolist()
        metrics["forget_quality"] = (None if retain_model_truth_ratios is None
                                     else forget_quality(ratios, retain_model_truth_ratios))
    if tofu.get("retain"):
        components = {"retain_prob": metrics["retain_prob"], "retain_rouge": metrics["retain_rouge"],
                      "retain_truth_ratio": float(np.maximum(0.0, 1.0 - scores["retain"]["truth_ratio"]).mean())}
        metrics["model_utility"] = model_utility(components, keys=tuple(components))
    metrics["glossary"] = {key: meaning for key, meaning in OWN_DATA_GLOSSARY.items()
                           if any(k.endswith(key) or k.startswith(key) for k in metrics)}
    return metrics
