"""Text to model inputs: QA, completion and corpus examples as token-id lists, and
:func:`collate` / :func:`collated_batches` to pad them into tensors."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from alter.data.formats import PromptFormat, prompt_format_of

IGNORE_INDEX = -100


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` ending in the EOS token (when the tokenizer has one), so the model learns to stop."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _check_length(ids: list[int], max_length: int, what: str) -> None:
    if max_length is not None and len(ids) > max_length:
        shown = what if len(what) <= 80 else what[:77] + "..."
        raise ValueError(f"example {shown!r} is {len(ids)} tokens long, more than max_length={max_length}; "
                         "shorten it or raise max_length (it is not truncated silently)")


def encode_completion(tokenizer, prompt: str, completion: str, max_length: int | None,
                      add_eos: bool = True, add_special_tokens: bool = True) -> dict[str, list[int]]:
    """Token ids of ``prompt + completion`` (plus EOS when ``add_eos``), labelled on the
    completion only. ``add_special_tokens=False`` for text that already holds them (a
    rendered chat template).

    Returns ``dict(input_ids, attention_mask, labels)`` of equal-length int lists with
    ``labels`` = -100 on the prompt. Raises ``ValueError`` naming the prompt when the
    sequence is longer than ``max_length`` tokens (``None``: no limit).
    """
    # Only a departure from the default is passed on: minimal tokenizers take no keyword.
    kwargs = {} if add_special_tokens else {"add_special_tokens": False}
    prompt_ids = tokenizer(prompt, **kwargs)["input_ids"]
    input_ids = tokenizer(prompt + completion, **kwargs)["input_ids"]
    input_ids = _with_eos(tokenizer, input_ids) if add_eos else input_ids
    _check_length(input_ids, max_length, prompt)
    # Subword tokenizers can merge across the prompt/completion boundary: the completion
    # starts where the two token sequences part.
    prompt_len = 0
    while prompt_len < min(len(prompt_ids), len(input_ids)) and prompt_ids[prompt_len] == input_ids[prompt_len]:
        prompt_len += 1
    labels = [IGNORE_INDEX] * prompt_len + input_ids[prompt_len:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_qa(tokenizer, question: str, answer: str, max_length: int | None,
              prompt_format: str | PromptFormat | None = None) -> dict[str, list[int]]:
    """Token ids of ``format_qa(question, answer)`` (or of another :class:`PromptFormat`)
    plus EOS, for training or scoring the answer.

    Returns ``dict(input_ids, attention_mask, labels)`` of equal-length int lists;
    ``labels`` is -100 on the prompt, so only the answer tokens (and EOS) are learned or
    scored. Raises ``ValueError`` naming the question when the example is longer than
    ``max_length`` tokens (``None``: no limit).
    """
    fmt = prompt_format_of(prompt_format)
    return encode_completion(tokenizer, fmt.prompt(tokenizer, question), fmt.completion(tokenizer, question, answer),
                             max_length, add_special_tokens=fmt.add_special_tokens)


def encode_text(tokenizer, text: str, max_length: int | None, truncate: bool = False) -> dict[str, list[int]]:
    """Token ids of a corpus text plus EOS, every token a label (language modelling).

    A text longer than ``max_length`` tokens raises ``ValueError`` naming it, unless
    ``truncate=True`` (long corpus documents, where a prefix is a fine training sample).
    """
    input_ids = _with_eos(tokenizer, tokenizer(text)["input_ids"])
    if truncate and max_length is not None:
        input_ids = input_ids[:max_length]
    _check_length(input_ids, max_length, text)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": list(input_ids)}


def _is_numeric_sequence(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (list, tuple)) and all(isinstance(x, (int, float, bool)) for x in value))


def pad_id_of(tokenizer) -> int:
    """The id :func:`collate` pads with: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return pad


def collate(batch: Sequence[dict], pad_token_id: int, padding_side: str = "right", *, device=None) -> dict:
    """Pad encoded examples to the longest and stack them into tensors.

    ``input_ids`` is padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` and
    ``keep_labels`` with -100 and any other per-token field (e.g. a cached ``entropy``) with 0; per-example
    numbers become a 1-D tensor and anything else a list. ``padding_side="left"`` is for
    generation. Returns a dict of ``[B, L]`` tensors (int64 ids, mask and labels), on
    ``device`` when given (else the CPU).
    """
    if not batch:
        raise ValueError("collate: batch is empty")
    if padding_side not in ("left", "right"):
        raise ValueError(f"collate: padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [len(example["input_ids"]) for example in batch]
    longest = max(lengths)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "keep_labels": IGNORE_INDEX}
    out = {}
    for key in batch[0]:
        values = [example[key] for example in batch]
        per_token = all(_is_numeric_sequence(v) and len(v) == n for v, n in zip(values, lengths))
        if per_token:
            fill = pad_values.get(key, 0)
            rows = []
            for v, n in zip(values, lengths):
                v = torch.as_tensor(v)
                pad = torch.full((longest - n,), fill, dtype=v.dtype)
                rows.append(torch.cat([v, pad] if padding_side == "right" else [pad, v]))
            out[key] = torch.stack(rows)
        elif all(isinstance(v, (int, float, bool)) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    if device is not None:
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def collated_batches(examples: Sequence[dict], pad_token_id: int, batch_size: int, *,
                     longest_first: bool = False, padding_side: str = "right",
                     keys: Sequence[str] | None = None, device=None) -> Iterator[tuple[list[int], dict]]:
    """Yields ``(indices, batch)``: the encoded ``examples`` ``batch_size`` at a time, in
    order, or longest first with ``longest_first`` (batches of similar lengths waste little
    on padding; callers put results back by ``indices``). The one batching loop of the
    library: evaluation, the base-model pass, the early stop's scores and the quality
    suite all batch through it.

    ``batch`` is :func:`collate` of ``[examples[i] for i in indices]`` (restricted to
    ``keys`` when given, e.g. to leave out fields that are not per-token) on ``device``.
    A bad ``batch_size`` raises ``ValueError`` at the call, not at the first batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = list(range(len(examples)))
    if longest_first:
        order.sort(key=lambda i: -len(examples[i]["input_ids"]))
    return _batches_in(order, examples, pad_token_id, batch_size, padding_side, keys, device)


def _batches_in(order: list[int], examples: Sequence[dict], pad_token_id: int, batch_size: int,
                padding_side: str, keys: Sequence[str] | None, device) -> Iterator[tuple[list[int], dict]]:
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        chunk = [examples[i] if keys is None else {k: examples[i][k] for k in keys} for i in indices]
        yield indices, collate(chunk, pad_token_id, padding_side, device=device)
