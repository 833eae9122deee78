"""MUSE's evaluation (``metrics/verbmem.py``, ``metrics/knowmem.py``, privleak), keyed by
open-unlearning's MUSE metric names."""
from __future__ import annotations

from typing import Mapping, Sequence

from alter.evaluation.generation import generate, rouge_l
from alter.evaluation.mia import all_mia_scores, mia_auc, privleak
from alter.evaluation.validation import check_columns


def verbmem_rouge(model, tokenizer, dataset, max_new_tokens: int = 128, batch_size: int = 8) -> float:
    """MUSE verbatim memorization (``metrics/verbmem.py``): mean ROUGE-L F1, without stemming,
    of the greedy ``max_new_tokens``-token continuation of each ``prompt`` against its ``gt``
    cut, as MUSE cuts it, to the first ``max_new_tokens`` tokens of ``tokenizer(gt)`` (the
    tokenizer's BOS counting as one) decoded without special tokens. MUSE reports it x100."""
    check_columns("verbmem_rouge", dataset, ("prompt", "gt"))
    generated = generate(model, tokenizer, list(dataset["prompt"]), max_new_tokens, batch_size)
    references = [tokenizer.decode(tokenizer(gt)["input_ids"][:max_new_tokens], skip_special_tokens=True)
                  for gt in dataset["gt"]]
    return float(rouge_l(generated, references, "fmeasure", stem=False).mean())


KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")


def knowmem_prompt(question: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
    """MUSE's knowmem prompt (``metrics/knowmem.py``): each few-shot pair as
    ``"Question: {q}\nAnswer: {a}\n\n"``, then ``"Question: {question}\nAnswer: "``."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in few_shot)
    return f"{shots}Question: {question}\nAnswer: "


def knowmem_rouge(model, tokenizer, dataset, few_shot=None, max_new_tokens: int = 32, batch_size: int = 16) -> float:
    """MUSE knowledge memorization: mean ROUGE-L F1, without stemming, of the greedy answer to
    each ``question`` against its ``answer``. The prompt is :func:`knowmem_prompt` with the
    ``few_shot`` examples (MUSE's ``forget_qa_icl`` / ``retain_qa_icl`` sets: a dataset with
    ``question`` and ``answer``, or (question, answer) pairs); the answer is cut before the
    first of :data:`KNOWMEM_STOP` (``"\n\n"``, ``"\nQuestion"``, ``"Question:"``), as
    MUSE and open-unlearning cut it, so that a right answer followed by a new question
    scores 1. MUSE reports it x100."""
    fn = "knowmem_rouge"
    check_columns(fn, dataset, ("question", "answer"))
    if few_shot is None:
        shots = []
    elif hasattr(few_shot, "column_names"):
        check_columns(fn, few_shot, ("question", "answer"), "few_shot")
        shots = list(zip(few_shot["question"], few_shot["answer"]))
    else:
        shots = [tuple(pair) for pair in few_shot]
        if not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in shots):
            raise TypeError(f"{fn}: few_shot must be a dataset or (question, answer) string pairs")
    prompts = [knowmem_prompt(q, shots) for q in dataset["question"]]
    generated = generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop=KNOWMEM_STOP)
    return float(rouge_l(generated, list(dataset["answer"]), "fmeasure", stem=False).mean())


def evaluate_muse(model, tokenizer, data, retain_model_auc: float | None = None, batch_size: int = 8,
                  max_length: int | None = 2048, mia_k: float = 0.4) -> dict[str, float]:
    """MUSE's evaluation, keyed by open-unlearning's MUSE metric names (``MUSE_SUMMARY.json``;
    values are fractions, MUSE's tables show them x100). ``data`` maps split names to
    datasets (:func:`alter.data.load_muse` reads them); each metric is computed when its
    splits are present:

    * ``forget_verbmem_ROUGE``: :func:`verbmem_rouge` (128 tokens) on ``verbmem``;
    * ``forget_knowmem_ROUGE`` / ``retain_knowmem_ROUGE``: :func:`knowmem_rouge` (32 tokens) on
      ``knowmem_forget`` / ``knowmem_retain`` with the few-shot examples of
      ``knowmem_forget_icl`` / ``knowmem_retain_icl``;
    * with ``forget`` and ``holdout`` (column ``text``; MUSE's privleak sets): ``mia_loss``,
      ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus`` (:func:`mia_auc`, texts cut at
      ``max_length`` tokens as open-unlearning does) and ``privleak`` of ``mia_min_k`` against
      ``retain_model_auc`` (the retain model's ``mia_min_k``; left out when not given).
    """
    fn = "evaluate_muse"
    if not isinstance(data, Mapping) or not any(k in data for k in ("verbmem", "knowmem_forget", "knowmem_retain",
                                                                      "forget")):
        raise ValueError(f"{fn}: data must map MUSE split names (verbmem, knowmem_forget, knowmem_retain, "
                         f"forget + holdout, ...) to datasets")
    results = {}
    if "verbmem" in data:
        results["forget_verbmem_ROUGE"] = verbmem_rouge(model, tokenizer, data["verbmem"], batch_size=batch_size)
    for side in ("forget", "retain"):
        if f"knowmem_{side}" in data:
            results[f"{side}_knowmem_ROUGE"] = knowmem_rouge(model, tokenizer, data[f"knowmem_{side}"],
                                                             data.get(f"knowmem_{side}_icl"), batch_size=batch_size)
    if "forget" in data:
        if "holdout" not in data:
            raise ValueError(f"{fn}: membership inference needs a 'holdout' split beside 'forget'")
        scores = {}
        for split in ("forget", "holdout"):
            check_columns(fn, data[split], ("text",), f"split {split!r}")
            scores[split] = all_mia_scores(model, tokenizer, data[split]["text"], None, None, mia_k, None,
                                           batch_size, max_length, fn)
        for attack in scores["forget"]:
            results[f"mia_{attack}"] = mia_auc(scores["forget"][attack], scores["holdout"][attack])
        if retain_model_auc is not None:
            results["privleak"] = privleak(results["mia_min_k"], retain_model_auc)
    return dict(sorted(results.items()))
