"""TOFU's metrics (TOFU and open-unlearning settings) and its evaluation,
:func:`evaluate_tofu`.

Per question with answer ``a``, paraphrased answer ``a~`` and perturbed (wrong) answers
``a^_1..a^_m``, probabilities being length-normalized, ``P(x) = exp(-mean token NLL of x
given the question)``:

* answer probability ``P(a)``;
* truth ratio ``R = P(a^) / P(a~)`` with ``P(a^) = (prod_j P(a^_j))^(1/m)``;
* forget quality: KS-test p-value between the unlearned and a retain model's ``R`` on
  the forget set;
* model utility: harmonic mean of nine numbers, see :func:`utility_components`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from alter.data import PromptFormat, encode_qa, prompt_format_of
from alter.evaluation.generation import rouge_l_recall
from alter.evaluation.memorization import answer_token_statistics, memorization_scores
from alter.evaluation.mia import all_mia_scores, mia_auc, privleak
from alter.evaluation.scoring import completion_nll, context_length
from alter.evaluation.validation import check_columns, check_pairs, check_samples

UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")
UTILITY_KEYS = tuple(f"{split}_{metric}" for split in UTILITY_SPLITS for metric in UTILITY_METRICS)


def answer_log_likelihood(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                          batch_size: int = 16, prompt_format: str | PromptFormat | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each answer (and EOS) given its question prompted by
    :func:`alter.data.format_qa` (or ``prompt_format``, see :class:`alter.data.PromptFormat`),
    and its number of tokens.

    Returns ``(nll_sum float64 [n], num_tokens int64 [n])``. An example longer than the
    model's context raises ``ValueError`` naming it.
    """
    fn = "answer_log_likelihood"
    questions, answers = check_pairs(fn, questions, answers)
    fmt = prompt_format_of(prompt_format)
    encoded = [encode_qa(tokenizer, q, a, context_length(model), fmt) for q, a in zip(questions, answers)]
    nll_sum, num_tokens = completion_nll(model, tokenizer, encoded, batch_size, fn)
    if (num_tokens == 0).any():
        bad = int(np.argmax(num_tokens == 0))
        raise ValueError(f"{fn}: answer {bad} ({answers[bad]!r}) has no tokens to score")
    return nll_sum, num_tokens


def _mean_answer_nll(model, tokenizer, questions, answers, batch_size, prompt_format=None) -> np.ndarray:
    nll_sum, num_tokens = answer_log_likelihood(model, tokenizer, questions, answers, batch_size, prompt_format)
    return nll_sum / num_tokens


def answer_probability(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                       batch_size: int = 16, prompt_format: str | PromptFormat | None = None) -> np.ndarray:
    """Length-normalized probability of each answer, ``exp(-mean token NLL)`` (float64 ``[n]``)."""
    return np.exp(-_mean_answer_nll(model, tokenizer, questions, answers, batch_size, prompt_format))


def _answer_losses(model, tokenizer, dataset, reference: str, batch_size: int, prompt_format=None):
    """Mean token NLL of each row's ``reference`` answer (``[n]``) and of each of its
    perturbed answers (list of ``[m_i]`` arrays), scored in one pass."""
    questions = list(dataset["question"])
    perturbed = []
    for i, answers in enumerate(dataset["perturbed_answer"]):
        # A bare string would be scored character by character.
        if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
            raise TypeError(f"row {i}: perturbed_answer must be a list of strings, got {answers!r:.80}")
        if not answers:
            raise ValueError(f"row {i}: perturbed_answer is empty")
        perturbed.append(list(answers))
    flat_questions = questions + [q for q, answers in zip(questions, perturbed) for _ in answers]
    flat_answers = list(dataset[reference]) + [a for answers in perturbed for a in answers]
    losses = _mean_answer_nll(model, tokenizer, flat_questions, flat_answers, batch_size, prompt_format)
    ends = len(questions) + np.cumsum([len(p) for p in perturbed])
    return losses[:len(questions)], np.split(losses[len(questions):], ends[:-1] - len(questions))


def _ratio(reference_loss: np.ndarray, perturbed_losses: list[np.ndarray]) -> np.ndarray:
    """``P(perturbed) / P(reference)``, P(perturbed) the geometric mean over the perturbed answers."""
    return np.exp(reference_loss - np.array([p.mean() for p in perturbed_losses]))


def truth_ratio(model, tokenizer, dataset, reference: str = "paraphrased_answer",
                batch_size: int = 16, prompt_format: str | PromptFormat | None = None) -> np.ndarray:
    """Per-question truth ratio ``P(perturbed) / P(reference)`` (float64 ``[n]``).

    ``dataset`` has columns ``question``, ``perturbed_answer`` (list of strings) and
    ``reference`` (the paraphrased answer, as TOFU does on forget/retain sets; ``"answer"``
    for sets without paraphrases). Probabilities are length-normalized; P(perturbed) is the
    geometric mean over the question's perturbed answers. Near 1: the model cannot tell the
    truth from plausible falsehoods; near 0: it knows the answer.
    """
    check_columns("truth_ratio", dataset, ["question", "perturbed_answer", reference])
    reference_loss, perturbed_losses = _answer_losses(model, tokenizer, dataset, reference, batch_size,
                                                      prompt_format)
    return _ratio(reference_loss, perturbed_losses)


def forget_quality(unlearned_truth_ratios, retain_truth_ratios) -> float:
    """TOFU forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
    (``scipy.stats.ks_2samp``) between the unlearned model's and a retain model's truth
    ratios on the forget set. High (near 1): indistinguishable from never having trained
    on the forget set. Ratios are >= 0; ``inf`` is accepted (``exp`` of a loss gap beyond
    709 nats overflows after aggressive unlearning, and the test only uses ranks)."""
    samples = []
    for name, values in (("unlearned_truth_ratios", unlearned_truth_ratios),
                         ("retain_truth_ratios", retain_truth_ratios)):
        array = check_samples("forget_quality", name, values, allow_inf=True)
        if (array < 0).any():
            raise ValueError(f"forget_quality: {name} must be >= 0 (truth ratios are ratios of probabilities)")
        samples.append(array)
    return float(stats.ks_2samp(*samples).pvalue)


def model_utility(components: Mapping[str, float], keys: Sequence[str] = UTILITY_KEYS) -> float:
    """TOFU model utility: the harmonic mean (``scipy.stats.hmean``) of the nine numbers
    of :func:`utility_components` (``keys``, default :data:`UTILITY_KEYS`; another set of
    components for data with other splits); 0 when any of them is 0."""
    if not isinstance(components, Mapping):
        raise TypeError(f"model_utility: components must be a mapping with keys {tuple(keys)}")
    missing = [k for k in keys if k not in components]
    if missing:
        raise ValueError(f"model_utility: components lacks {missing}")
    values = check_samples("model_utility", "components", [components[k] for k in keys])
    if (values < 0).any():
        raise ValueError("model_utility: components must be >= 0")
    if (values == 0).any():  # the limit of the harmonic mean; hmean itself would divide by 0
        return 0.0
    return float(stats.hmean(values))


_QA_COLUMNS = ("question", "answer", "perturbed_answer")


def _check_tofu_data(fn: str, data, splits: Sequence[str]) -> None:
    """Every split present, with the columns its metrics read (checked before any work)."""
    for split in splits:
        if split not in data:
            raise ValueError(f"{fn}: data lacks the split {split!r}; it has {list(data)}")
        paraphrased = ("paraphrased_answer",) if split in ("forget", "retain") else ()
        check_columns(fn, data[split], _QA_COLUMNS + paraphrased, f"split {split!r}")


def _first_questions(fn: str, data, num_questions: int | None) -> dict:
    """The first ``num_questions`` rows of every split (all when None), as TOFU's ``ds_size``."""
    if num_questions is None:
        return dict(data)
    if isinstance(num_questions, bool) or not isinstance(num_questions, int) or num_questions < 1:
        raise ValueError(f"{fn}: num_questions must be a positive int or None, got {num_questions!r}")
    return {name: split.select(range(min(num_questions, len(split)))) for name, split in data.items()}


def _split_scores(model, tokenizer, dataset, reference: str, normalize_prob: bool,
                  batch_size: int, max_new_tokens: int, prompt_format=None) -> dict:
    """Answer probability, ROUGE-L recall and truth ratio of every row of a TOFU split."""
    if reference == "answer":
        answer_loss, perturbed_losses = _answer_losses(model, tokenizer, dataset, "answer", batch_size, prompt_format)
        reference_loss = answer_loss
    else:
        reference_loss, perturbed_losses = _answer_losses(model, tokenizer, dataset, reference, batch_size,
                                                          prompt_format)
        answer_loss = _mean_answer_nll(model, tokenizer, dataset["question"], dataset["answer"], batch_size,
                                       prompt_format)
    prob = np.exp(-answer_loss)
    if normalize_prob:  # P(a) / (P(a) + sum_j P(a^_j))
        prob = prob / (prob + np.array([np.exp(-p).sum() for p in perturbed_losses]))
    return {
        "prob": prob,
        "rouge": rouge_l_recall(model, tokenizer, dataset["question"], dataset["answer"],
                                max_new_tokens, batch_size, prompt_format),
        "truth_ratio": _ratio(reference_loss, perturbed_losses),
    }


def utility_components(model, tokenizer, data, batch_size: int = 16, max_new_tokens: int = 32,
                       prompt_format: str | PromptFormat | None = None) -> dict[str, float]:
    """The nine numbers whose harmonic mean is TOFU's model utility, keyed
    ``"{split}_{metric}"`` for split in retain, real_authors, world_facts and metric in

    * ``prob``: mean answer probability; on real_authors / world_facts normalized,
      ``P(a) / (P(a) + sum_j P(a^_j))``;
    * ``rouge``: mean ROUGE-L recall of the greedy answer;
    * ``truth_ratio``: mean of ``max(0, 1 - R)``, with ``R = P(perturbed) / P(paraphrased)``
      on retain and ``P(perturbed) / P(answer)`` on real_authors / world_facts.

    ``data``: a mapping (e.g. a ``DatasetDict``) with those three splits; each has
    ``question``, ``answer``, ``perturbed_answer`` and, on retain, ``paraphrased_answer``.
    """
    _check_tofu_data("utility_components", data, UTILITY_SPLITS)
    components = {}
    for split in UTILITY_SPLITS:
        reference = "paraphrased_answer" if split == "retain" else "answer"
        scores = _split_scores(model, tokenizer, data[split], reference, split != "retain",
                               batch_size, max_new_tokens, prompt_format)
        components[f"{split}_prob"] = float(scores["prob"].mean())
        components[f"{split}_rouge"] = float(scores["rouge"].mean())
        components[f"{split}_truth_ratio"] = float(np.maximum(0.0, 1.0 - scores["truth_ratio"]).mean())
    return components


def evaluate_tofu(model, tokenizer, data, retain_model_truth_ratios=None, batch_size: int = 16,
                  max_new_tokens: int = 32, prompt_format: str | PromptFormat | None = None,
                  num_questions: int | None = None, retain_model_auc: float | None = None,
                  reference_model=None, mia_k: float = 0.4) -> dict:
    """The TOFU evaluation of a model on ``data`` (splits forget, retain, real_authors,
    world_facts and optionally holdout, as :func:`alter.data.tofu_mini` makes them).

    Returns a dict with

    * ``forget_quality``: KS-test p-value against ``retain_model_truth_ratios`` (the forget-set
      truth ratios of a model never trained on the forget set), None when not given;
    * ``model_utility`` and its nine ``utility_components``;
    * ``forget_prob``, ``retain_prob`` (mean answer probability), ``forget_rouge``,
      ``retain_rouge`` (mean ROUGE-L recall);
    * ``forget_truth_ratio``: TOFU's summary, mean of ``min(R, 1/R)`` on the forget set;
    * ``forget_truth_ratios``: the per-question ``R`` on the forget set (list of floats): pass
      a retain model's as ``retain_model_truth_ratios`` when evaluating unlearned models;
    * ``extraction_strength``, ``exact_memorization``: means over the forget set
      (:func:`~alter.evaluation.memorization.extraction_strength`,
      :func:`~alter.evaluation.memorization.exact_memorization`);
    * with a holdout split, the membership-inference AUCs of forget (members) against holdout
      (:func:`mia_auc`): ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``
      (k = ``mia_k``) and, given a ``reference_model`` (e.g. the retain model),
      ``mia_reference``; and ``privleak`` (:func:`privleak` of ``mia_min_k`` against
      ``retain_model_auc``, the retain model's ``mia_min_k``; None when not given).

    ``max_new_tokens`` bounds the greedy answers scored by ROUGE: 32 fits ``tofu_mini``;
    TOFU and open-unlearning generate up to 200 tokens (``alter eval``'s default).
    ``prompt_format``: see :class:`alter.data.PromptFormat`. ``num_questions``: only the
    first N rows of every split (TOFU's ``ds_size``: 300).
    """
    fn = "evaluate_tofu"
    _check_tofu_data(fn, data, ("forget",) + UTILITY_SPLITS)
    data = _first_questions(fn, data, num_questions)
    fmt = prompt_format_of(prompt_format)
    forget = _split_scores(model, tokenizer, data["forget"], "paraphrased_answer", False,
                           batch_size, max_new_tokens, fmt)
    components = utility_components(model, tokenizer, data, batch_size, max_new_tokens, fmt)
    ratios = forget["truth_ratio"]
    # The forget answers' token statistics serve memorization and, with a holdout, the attacks.
    forget_stats = answer_token_statistics("extraction_strength", model, tokenizer, data["forget"]["question"],
                                           data["forget"]["answer"], batch_size, fmt)
    memorization = memorization_scores(forget_stats)
    metrics = {
        "forget_quality": None if retain_model_truth_ratios is None
        else forget_quality(ratios, retain_model_truth_ratios),
        "model_utility": model_utility(components),
        "forget_prob": float(forget["prob"].mean()),
        "retain_prob": components["retain_prob"],
        "forget_rouge": float(forget["rouge"].mean()),
        "retain_rouge": components["retain_rouge"],
        "forget_truth_ratio": float(np.minimum(ratios, 1.0 / ratios).mean()),
        "forget_truth_ratios": ratios.tolist(),
        "utility_components": components,
        "extraction_strength": float(memorization["extraction_strength"].mean()),
        "exact_memorization": float(memorization["exact_memorization"].mean()),
    }
    if "holdout" in data:
        check_columns(fn, data["holdout"], ("question", "answer"), "split 'holdout'")
        scores = {split: all_mia_scores(model, tokenizer, data[split]["answer"], data[split]["question"], fmt,
                                        mia_k, reference_model, batch_size,
                                        target_stats=forget_stats if split == "forget" else None)
                  for split in ("forget", "holdout")}
        for attack in scores["forget"]:
            metrics[f"mia_{attack}"] = mia_auc(scores["forget"][attack], scores["holdout"][attack])
        metrics["privleak"] = None if retain_model_auc is None else privleak(metrics["mia_min_k"], retain_model_auc)
    return metrics
