"""Greedy generation (``model.generate``) and the ROUGE-L scores of generated answers
(``rouge_score``), as TOFU, open-unlearning and MUSE compute them."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from alter.data import PromptFormat, pad_id_of, prompt_format_of
from alter.evaluation.scoring import context_length, device_of, padded_batches
from alter.evaluation.validation import check_pairs, check_texts
from alter.adapters import evaluating


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
             batch_size: int = 16, stop: Sequence[str] = (), add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``: at most ``max_new_tokens`` new tokens, decoded
    without special tokens, cut before the first occurrence of any ``stop`` string (as MUSE
    and open-unlearning cut knowmem answers), then stripped of outer whitespace.
    ``add_special_tokens=False`` for prompts that hold their own (a rendered chat template).
    A prompt that leaves no room for ``max_new_tokens`` in the model's context raises
    ``ValueError`` naming it."""
    prompts = check_texts("generate", "prompts", prompts)
    stop = check_texts("generate", "stop", stop)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if any(not word for word in stop):
        raise ValueError("generate: stop strings must be non-empty")
    context = context_length(model)
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(f"generate: prompt {prompt[:80]!r} is {len(ids)} tokens; with max_new_tokens="
                             f"{max_new_tokens} it exceeds the model's context of {context}")
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    device, pad_id = device_of(model), pad_id_of(tokenizer)
    texts = [""] * len(prompts)
    with evaluating(model):
        # Left padding: generation continues at the right end.
        for indices, batch in padded_batches(encoded, batch_size, "generate", pad_id, padding_side="left"):
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            for i, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                for word in stop:
                    text = text.split(word)[0]
                texts[i] = text.strip()
    return texts


def rouge_l(predictions: Sequence[str], references: Sequence[str], field: str, stem: bool = True) -> np.ndarray:
    """ROUGE-L ``field`` ("recall" or "fmeasure") of each prediction against its reference
    (float64 ``[n]``); TOFU stems words (Porter), MUSE does not."""
    try:  # the [eval] extra: the rest of the package imports without it
        from rouge_score import rouge_scorer
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("ROUGE-L needs rouge-score: pip install 'alter-kernels[eval]'",
                                  name="rouge_score") from exc
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    return np.array([getattr(scorer.score(ref, pred)["rougeL"], field)
                     for pred, ref in zip(predictions, references)], dtype=np.float64)


def rouge_l_recall(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                   max_new_tokens: int = 32, batch_size: int = 16,
                   prompt_format: str | PromptFormat | None = None) -> np.ndarray:
    """ROUGE-L recall (rouge_score, stemmed, as TOFU) of the greedy answer to each question
    (prompted by :func:`alter.data.format_qa`, or ``prompt_format``) against the true answer
    (float64 ``[n]``). TOFU and open-unlearning generate up to 200 tokens."""
    questions, answers = check_pairs("rouge_l_recall", questions, answers)
    fmt = prompt_format_of(prompt_format)
    generated = generate(model, tokenizer, [fmt.prompt(tokenizer, q) for q in questions], max_new_tokens, batch_size,
                         add_special_tokens=fmt.add_special_tokens)
    return rouge_l(generated, answers, "recall")
