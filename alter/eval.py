"""Evaluation of unlearning: TOFU metrics, multiple-choice accuracy (WMDP, MMLU) and MUSE
memorization (definitions in ``shared/DATASETS.md``).

Every function takes any causal LM that ``model(input_ids=..., attention_mask=...)``
answers with logits (an ALTER-patched model included) and its tokenizer; generation uses
``model.generate`` (greedy). Statistics come from ``scipy.stats`` and ROUGE from
``rouge_score``. Per-example results are float64 numpy arrays.

TOFU, per question with answer ``a``, paraphrased answer ``a~`` and perturbed (wrong)
answers ``a^_1..a^_m``, probabilities being length-normalized, ``P(x) = exp(-mean token
NLL of x given the question)``:

* answer probability ``P(a)``;
* truth ratio ``R = P(a^) / P(a~)`` with ``P(a^) = (prod_j P(a^_j))^(1/m)``;
* forget quality: KS-test p-value between the unlearned and a retain model's ``R`` on
  the forget set;
* model utility: harmonic mean of nine numbers, see :func:`utility_components`.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from scipy import stats
from tqdm.auto import tqdm

from alter.data import IGNORE_INDEX, MCQ_LETTERS, collate, encode_completion, encode_qa, format_mcq, format_qa

UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")
UTILITY_KEYS = tuple(f"{split}_{metric}" for split in UTILITY_SPLITS for metric in UTILITY_METRICS)


# --------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _evaluating(model):
    """No gradients and eval mode (no dropout), restoring the model's mode afterwards."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def _context_length(model) -> int | None:
    """The model's context (``config.max_position_embeddings``), None when unknown."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _logits(output) -> torch.Tensor:
    """Logits from a model output: a ``ModelOutput``, a tuple, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return pad


def _batches(encoded: Sequence[dict], batch_size: int, desc: str):
    """Yields ``(indices, examples)`` batches of the encoded examples, longest first: batches
    of similar lengths waste little on padding. Callers put results back by ``indices``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{desc}: batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=None if len(starts) > 1 else True):
        indices = order[start:start + batch_size]
        yield indices, [encoded[i] for i in indices]


def _completion_nll(model, tokenizer, encoded: Sequence[dict], batch_size: int, desc: str):
    """Summed NLL (float64 ``[n]``) and number (int64 ``[n]``) of the labelled tokens of
    each encoded example (from :func:`alter.data.encode_completion`)."""
    device, pad_id = _device(model), _pad_id(tokenizer)
    nll_sums, counts = np.zeros(len(encoded), dtype=np.float64), np.zeros(len(encoded), dtype=np.int64)
    with _evaluating(model):
        for indices, chunk in _batches(encoded, batch_size, desc):
            batch = collate([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in chunk], pad_id)
            logits = _logits(model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)))
            targets = batch["labels"][:, 1:].to(logits.device)
            # One example at a time keeps the float32 copy of the logits at [L, V].
            nll = torch.stack([F.cross_entropy(row[:-1].float(), row_targets, ignore_index=IGNORE_INDEX,
                                               reduction="sum") for row, row_targets in zip(logits, targets)])
            nll_sums[indices] = nll.double().cpu().numpy()
            counts[indices] = (targets != IGNORE_INDEX).sum(dim=1).cpu().numpy()
    return nll_sums, counts


def _check_texts(fn: str, name: str, values) -> list[str]:
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{fn}: {name} must be a sequence of strings")
    return list(values)


def _check_pairs(fn: str, questions, answers) -> tuple[list[str], list[str]]:
    questions, answers = _check_texts(fn, "questions", questions), _check_texts(fn, "answers", answers)
    if len(questions) != len(answers):
        raise ValueError(f"{fn}: questions and answers differ in length ({len(questions)} vs {len(answers)})")
    if not questions:
        raise ValueError(f"{fn}: questions is empty")
    return questions, answers


def _check_columns(fn: str, dataset, columns: Sequence[str], what: str = "dataset") -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{fn}: {what} lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{fn}: {what} is empty")


# --------------------------------------------------------------------------------------
# Likelihood metrics
# --------------------------------------------------------------------------------------


def answer_log_likelihood(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                          batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each answer (and EOS) given its question prompted by
    :func:`alter.data.format_qa`, and its number of tokens.

    Returns ``(nll_sum float64 [n], num_tokens int64 [n])``. An example longer than the
    model's context raises ``ValueError`` naming it.
    """
    fn = "answer_log_likelihood"
    questions, answers = _check_pairs(fn, questions, answers)
    encoded = [encode_qa(tokenizer, q, a, _context_length(model)) for q, a in zip(questions, answers)]
    nll_sum, num_tokens = _completion_nll(model, tokenizer, encoded, batch_size, fn)
    if (num_tokens == 0).any():
        bad = int(np.argmax(num_tokens == 0))
        raise ValueError(f"{fn}: answer {bad} ({answers[bad]!r}) has no tokens to score")
    return nll_sum, num_tokens


def _mean_answer_nll(model, tokenizer, questions, answers, batch_size) -> np.ndarray:
    nll_sum, num_tokens = answer_log_likelihood(model, tokenizer, questions, answers, batch_size)
    return nll_sum / num_tokens


def answer_probability(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                       batch_size: int = 16) -> np.ndarray:
    """Length-normalized probability of each answer, ``exp(-mean token NLL)`` (float64 ``[n]``)."""
    return np.exp(-_mean_answer_nll(model, tokenizer, questions, answers, batch_size))


def _answer_losses(model, tokenizer, dataset, reference: str, batch_size: int):
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
    losses = _mean_answer_nll(model, tokenizer, flat_questions, flat_answers, batch_size)
    ends = len(questions) + np.cumsum([len(p) for p in perturbed])
    return losses[:len(questions)], np.split(losses[len(questions):], ends[:-1] - len(questions))


def _ratio(reference_loss: np.ndarray, perturbed_losses: list[np.ndarray]) -> np.ndarray:
    """``P(perturbed) / P(reference)``, P(perturbed) the geometric mean over the perturbed answers."""
    return np.exp(reference_loss - np.array([p.mean() for p in perturbed_losses]))


def truth_ratio(model, tokenizer, dataset, reference: str = "paraphrased_answer",
                batch_size: int = 16) -> np.ndarray:
    """Per-question truth ratio ``P(perturbed) / P(reference)`` (float64 ``[n]``).

    ``dataset`` has columns ``question``, ``perturbed_answer`` (list of strings) and
    ``reference`` (the paraphrased answer, as TOFU does on forget/retain sets; ``"answer"``
    for sets without paraphrases). Probabilities are length-normalized; P(perturbed) is the
    geometric mean over the question's perturbed answers. Near 1: the model cannot tell the
    truth from plausible falsehoods; near 0: it knows the answer.
    """
    _check_columns("truth_ratio", dataset, ["question", "perturbed_answer", reference])
    reference_loss, perturbed_losses = _answer_losses(model, tokenizer, dataset, reference, batch_size)
    return _ratio(reference_loss, perturbed_losses)


# --------------------------------------------------------------------------------------
# Generation metrics
# --------------------------------------------------------------------------------------


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded new tokens, special tokens and outer
    whitespace stripped). A prompt that leaves no room for ``max_new_tokens`` in the
    model's context raises ``ValueError`` naming it."""
    prompts = _check_texts("generate", "prompts", prompts)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    context = _context_length(model)
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(f"generate: prompt {prompt[:80]!r} is {len(ids)} tokens; with max_new_tokens="
                             f"{max_new_tokens} it exceeds the model's context of {context}")
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    device, pad_id = _device(model), _pad_id(tokenizer)
    texts = [""] * len(prompts)
    with _evaluating(model):
        for indices, chunk in _batches(encoded, batch_size, "generate"):
            batch = collate(chunk, pad_id, padding_side="left")  # generation continues at the right end
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            for i, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                texts[i] = text.strip()
    return texts


def _rouge_l(predictions: Sequence[str], references: Sequence[str], field: str) -> np.ndarray:
    """ROUGE-L ``field`` ("recall" or "fmeasure") of each prediction against its reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([getattr(scorer.score(ref, pred)["rougeL"], field)
                     for pred, ref in zip(predictions, references)], dtype=np.float64)


def rouge_l_recall(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                   max_new_tokens: int = 32, batch_size: int = 16) -> np.ndarray:
    """ROUGE-L recall (rouge_score, stemmed) of the greedy answer to each question
    (prompted by :func:`alter.data.format_qa`) against the true answer (float64 ``[n]``)."""
    questions, answers = _check_pairs("rouge_l_recall", questions, answers)
    generated = generate(model, tokenizer, [format_qa(q) for q in questions], max_new_tokens, batch_size)
    return _rouge_l(generated, answers, "recall")


# --------------------------------------------------------------------------------------
# TOFU summary metrics
# --------------------------------------------------------------------------------------


def _check_samples(fn: str, name: str, values, allow_inf: bool = False) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if np.isnan(array).any() or (not allow_inf and np.isinf(array).any()):
        raise ValueError(f"{fn}: {name} contains NaN{'' if allow_inf else ' or infinite'} values")
    return array


def forget_quality(unlearned_truth_ratios, retain_truth_ratios) -> float:
    """TOFU forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
    (``scipy.stats.ks_2samp``) between the unlearned model's and a retain model's truth
    ratios on the forget set. High (near 1): indistinguishable from never having trained
    on the forget set. Ratios are >= 0; ``inf`` is accepted (``exp`` of a loss gap beyond
    709 nats overflows after aggressive unlearning, and the test only uses ranks)."""
    samples = []
    for name, values in (("unlearned_truth_ratios", unlearned_truth_ratios),
                         ("retain_truth_ratios", retain_truth_ratios)):
        array = _check_samples("forget_quality", name, values, allow_inf=True)
        if (array < 0).any():
            raise ValueError(f"forget_quality: {name} must be >= 0 (truth ratios are ratios of probabilities)")
        samples.append(array)
    return float(stats.ks_2samp(*samples).pvalue)


def model_utility(components: Mapping[str, float]) -> float:
    """TOFU model utility: the harmonic mean (``scipy.stats.hmean``) of the nine numbers
    of :func:`utility_components` (keys :data:`UTILITY_KEYS`); 0 when any of them is 0."""
    if not isinstance(components, Mapping):
        raise TypeError(f"model_utility: components must be a mapping with keys {UTILITY_KEYS}")
    missing = [k for k in UTILITY_KEYS if k not in components]
    if missing:
        raise ValueError(f"model_utility: components lacks {missing}")
    values = _check_samples("model_utility", "components", [components[k] for k in UTILITY_KEYS])
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
        _check_columns(fn, data[split], _QA_COLUMNS + paraphrased, f"split {split!r}")


def _split_scores(model, tokenizer, dataset, reference: str, normalize_prob: bool,
                  batch_size: int, max_new_tokens: int) -> dict:
    """Answer probability, ROUGE-L recall and truth ratio of every row of a TOFU split."""
    if reference == "answer":
        answer_loss, perturbed_losses = _answer_losses(model, tokenizer, dataset, "answer", batch_size)
        reference_loss = answer_loss
    else:
        reference_loss, perturbed_losses = _answer_losses(model, tokenizer, dataset, reference, batch_size)
        answer_loss = _mean_answer_nll(model, tokenizer, dataset["question"], dataset["answer"], batch_size)
    prob = np.exp(-answer_loss)
    if normalize_prob:  # P(a) / (P(a) + sum_j P(a^_j))
        prob = prob / (prob + np.array([np.exp(-p).sum() for p in perturbed_losses]))
    return {
        "prob": prob,
        "rouge": rouge_l_recall(model, tokenizer, dataset["question"], dataset["answer"],
                                max_new_tokens, batch_size),
        "truth_ratio": _ratio(reference_loss, perturbed_losses),
    }


def utility_components(model, tokenizer, data, batch_size: int = 16, max_new_tokens: int = 32) -> dict[str, float]:
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
                               batch_size, max_new_tokens)
        components[f"{split}_prob"] = float(scores["prob"].mean())
        components[f"{split}_rouge"] = float(scores["rouge"].mean())
        components[f"{split}_truth_ratio"] = float(np.maximum(0.0, 1.0 - scores["truth_ratio"]).mean())
    return components


def evaluate_tofu(model, tokenizer, data, retain_model_truth_ratios=None, batch_size: int = 16,
                  max_new_tokens: int = 32) -> dict:
    """The TOFU evaluation of a model on ``data`` (splits forget, retain, real_authors,
    world_facts, as :func:`alter.data.tofu_mini` makes them).

    Returns a dict with

    * ``forget_quality``: KS-test p-value against ``retain_model_truth_ratios`` (the forget-set
      truth ratios of a model never trained on the forget set), None when not given;
    * ``model_utility`` and its nine ``utility_components``;
    * ``forget_prob``, ``retain_prob`` (mean answer probability), ``forget_rouge``,
      ``retain_rouge`` (mean ROUGE-L recall);
    * ``forget_truth_ratio``: TOFU's summary, mean of ``min(R, 1/R)`` on the forget set;
    * ``forget_truth_ratios``: the per-question ``R`` on the forget set (list of floats): pass
      a retain model's as ``retain_model_truth_ratios`` when evaluating unlearned models.

    ``max_new_tokens`` bounds the greedy answers scored by ROUGE: 32 fits ``tofu_mini``;
    real TOFU answers are longer (its reference harness generates up to 200 tokens).
    """
    _check_tofu_data("evaluate_tofu", data, ("forget",) + UTILITY_SPLITS)
    forget = _split_scores(model, tokenizer, data["forget"], "paraphrased_answer", False,
                           batch_size, max_new_tokens)
    components = utility_components(model, tokenizer, data, batch_size, max_new_tokens)
    retain_prob = components["retain_prob"]
    ratios = forget["truth_ratio"]
    return {
        "forget_quality": None if retain_model_truth_ratios is None
        else forget_quality(ratios, retain_model_truth_ratios),
        "model_utility": model_utility(components),
        "forget_prob": float(forget["prob"].mean()),
        "retain_prob": retain_prob,
        "forget_rouge": float(forget["rouge"].mean()),
        "retain_rouge": components["retain_rouge"],
        "forget_truth_ratio": float(np.minimum(ratios, 1.0 / ratios).mean()),
        "forget_truth_ratios": ratios.tolist(),
        "utility_components": components,
    }


# --------------------------------------------------------------------------------------
# Multiple choice (WMDP, MMLU) and MUSE
# --------------------------------------------------------------------------------------

def _last_token_logprobs(model, tokenizer, prompt_ids: Sequence[list[int]], candidates: np.ndarray,
                         batch_size: int) -> np.ndarray:
    """Log-probabilities ``[n, C]`` of the candidate next tokens after each prompt.

    Position ids count real tokens only, when the model takes them: models with absolute
    position embeddings (GPT-2, OPT) would otherwise score a left-padded prompt
    differently from the same prompt alone (RoPE models would not: RoPE is relative)."""
    device, pad_id = _device(model), _pad_id(tokenizer)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    encoded = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompt_ids]
    scores = np.zeros(candidates.shape, dtype=np.float64)
    with _evaluating(model):
        for indices, chunk in _batches(encoded, batch_size, "mcq_accuracy"):
            batch = collate(chunk, pad_id, padding_side="left")  # the last position is the prompt's end
            mask = batch["attention_mask"].to(device)
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
            if takes_positions:  # a left-padded row starts at position 0, as it would alone
                inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = _logits(model(**inputs))
            logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
            rows = torch.as_tensor(candidates[indices], device=logprobs.device)
            scores[indices] = logprobs.gather(1, rows).double().cpu().numpy()
    return scores


def mcq_accuracy(model, tokenizer, dataset, batch_size: int = 16) -> float:
    """Zero-shot multiple-choice accuracy (WMDP / MMLU): the predicted choice is the letter
    (``" A"``, ``" B"``, ...) with the highest log-likelihood after :func:`format_mcq`.

    ``dataset``: columns ``question``, ``choices`` (list of strings), ``answer`` (int index).
    When every letter is one token after the prompt (the usual case), one forward pass per
    question scores them all; otherwise each letter's continuation is scored in full.
    """
    fn = "mcq_accuracy"
    _check_columns(fn, dataset, ("question", "choices", "answer"))
    context = _context_length(model)
    prompt_ids, encoded, num_choices, answers = [], [], [], []
    for i, row in enumerate(dataset):
        choices, answer = list(row["choices"]), row["answer"]
        if not 2 <= len(choices) <= len(MCQ_LETTERS):
            raise ValueError(f"{fn}: row {i} has {len(choices)} choices; need 2 to {len(MCQ_LETTERS)}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{fn}: row {i} has answer {answer!r}; need an int index into its {len(choices)} choices")
        prompt = format_mcq(row["question"], choices)
        prompt_ids.append(tokenizer(prompt)["input_ids"])
        encoded.append([encode_completion(tokenizer, prompt, f" {letter}", context, add_eos=False)
                        for letter in MCQ_LETTERS[:len(choices)]])
        num_choices.append(len(choices))
        answers.append(answer)
    if any(len({tuple(e["input_ids"]) for e in row}) < len(row) for row in encoded):
        raise ValueError(f"{fn}: the tokenizer cannot tell the answer letters apart (unknown tokens?)")
    single_token = all(e["input_ids"][:-1] == ids for ids, row in zip(prompt_ids, encoded) for e in row)
    if single_token and len(set(num_choices)) == 1:
        letter_ids = np.array([[e["input_ids"][-1] for e in row] for row in encoded])
        scores = _last_token_logprobs(model, tokenizer, prompt_ids, letter_ids, batch_size)
    else:
        nll_sum, _ = _completion_nll(model, tokenizer, [e for row in encoded for e in row], batch_size, fn)
        scores = [-s for s in np.split(nll_sum, np.cumsum(num_choices)[:-1])]
    predictions = np.array([int(np.argmax(s)) for s in scores])
    return float((predictions == np.array(answers)).mean())


def verbmem_rouge(model, tokenizer, dataset, max_new_tokens: int = 128, batch_size: int = 8) -> float:
    """MUSE verbatim memorization: mean ROUGE-L F1 of the greedy ``max_new_tokens``-token
    continuation of each ``prompt`` against its ``gt``."""
    _check_columns("verbmem_rouge", dataset, ("prompt", "gt"))
    generated = generate(model, tokenizer, list(dataset["prompt"]), max_new_tokens, batch_size)
    return float(_rouge_l(generated, list(dataset["gt"]), "fmeasure").mean())


def knowmem_rouge(model, tokenizer, dataset, max_new_tokens: int = 32, batch_size: int = 16) -> float:
    """MUSE knowledge memorization: mean ROUGE-L F1 of the greedy answer to each
    ``question`` (prompted by :func:`alter.data.format_qa`) against its ``answer``."""
    _check_columns("knowmem_rouge", dataset, ("question", "answer"))
    generated = generate(model, tokenizer, [format_qa(q) for q in dataset["question"]], max_new_tokens, batch_size)
    return float(_rouge_l(generated, list(dataset["answer"]), "fmeasure").mean())
