"""The teacher-forced scoring pass shared by every evaluation protocol.

Encoded examples (``input_ids``, ``attention_mask`` and, for scoring a completion,
``labels``, as :func:`alter.data.encode_completion` makes them) go through the model in
batches, longest first so that batches of similar lengths waste little on padding, in
eval mode without gradients (:func:`forward_batches`). What the protocols read from its
logits is built on that one loop:

* :func:`labelled_logits`: per example, the logits at the labelled positions and their
  targets; :func:`completion_nll` (likelihood metrics, TOFU, MCQ) and
  :func:`token_statistics` (membership inference, memorization) reduce them;
* :func:`last_token_logprobs`: the log-probabilities of candidate next tokens after
  left-padded prompts (multiple choice).

Generation batches its prompts with :func:`padded_batches`, the same batching.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alter.data import IGNORE_INDEX, collated_batches, pad_id_of
from alter.adapters import evaluating

# The fields of an encoded example that the model reads or that score it.
_FIELDS = ("input_ids", "attention_mask", "labels")


def device_of(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def context_length(model) -> int | None:
    """The model's context (``config.max_position_embeddings``), None when unknown."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _logits(output) -> torch.Tensor:
    """Logits from a model output: a ``ModelOutput``, a tuple, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


def padded_batches(encoded: Sequence[dict], batch_size: int, desc: str, pad_id: int, padding_side: str = "right"):
    """Yields ``(indices, batch)``: :func:`alter.data.collated_batches` of the encoded
    examples, longest first, with ``padding_side`` (int64 ``[b, L]`` tensors on the CPU),
    under a progress bar. Callers put results back by ``indices``. ``desc`` names the
    caller in the progress bar and in the error a bad ``batch_size`` raises."""
    keys = [k for k in _FIELDS if all(k in example for example in encoded)]
    try:
        batches = collated_batches(encoded, pad_id, batch_size, longest_first=True, padding_side=padding_side,
                                   keys=keys)
    except ValueError as exc:
        raise ValueError(f"{desc}: {exc}") from exc
    n_batches = math.ceil(len(encoded) / batch_size)
    yield from tqdm(batches, total=n_batches, desc=desc, leave=False, disable=None if n_batches > 1 else True)


def forward_batches(model, tokenizer, encoded: Sequence[dict], batch_size: int, desc: str,
                    padding_side: str = "right"):
    """Yields ``(indices, logits [b, L, V] in the model's dtype, batch)`` for the
    :func:`padded_batches` of ``encoded``, the model in eval mode without gradients.

    Left-padded rows get position ids that count real tokens only, when the model takes
    them: models with absolute position embeddings (GPT-2, OPT) would otherwise score a
    left-padded prompt differently from the same prompt alone (RoPE models would not:
    RoPE is relative)."""
    device, pad_id = device_of(model), pad_id_of(tokenizer)
    parameters = inspect.signature(model.forward).parameters
    takes_positions = padding_side == "left" and "position_ids" in parameters
    # No KV cache: scoring continues none, and a patched model would link its per-call
    # state to it (a prepass would keep a base-model cache too).
    no_cache = {"use_cache": False} if "use_cache" in parameters else {}
    with evaluating(model):
        for indices, batch in padded_batches(encoded, batch_size, desc, pad_id, padding_side):
            mask = batch["attention_mask"].to(device)
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask, **no_cache}
            if takes_positions:  # a left-padded row starts at position 0, as it would alone
                inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
            yield indices, _logits(model(**inputs)), batch


def labelled_logits(model, tokenizer, encoded: Sequence[dict], batch_size: int, desc: str):
    """Yields ``(i, logits [n_i, V] float32, targets [n_i] int64)`` for every encoded example
    (from :func:`alter.data.encode_completion`): the model's next-token logits at the
    positions whose next token is labelled, and those tokens, in order."""
    for indices, logits, batch in forward_batches(model, tokenizer, encoded, batch_size, desc):
        targets = batch["labels"][:, 1:].to(logits.device)
        # One example at a time keeps the float32 copy of the logits at [L, V].
        for i, row, row_targets in zip(indices, logits, targets):
            keep = row_targets != IGNORE_INDEX
            yield i, row[:-1][keep].float(), row_targets[keep]


def completion_nll(model, tokenizer, encoded: Sequence[dict], batch_size: int, desc: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (float64 ``[n]``) and number (int64 ``[n]``) of the labelled tokens of
    each encoded example (from :func:`alter.data.encode_completion`)."""
    nll_sums, counts = np.zeros(len(encoded), dtype=np.float64), np.zeros(len(encoded), dtype=np.int64)
    for i, logits, targets in labelled_logits(model, tokenizer, encoded, batch_size, desc):
        nll_sums[i] = F.cross_entropy(logits, targets, reduction="sum").double().item() if len(targets) else 0.0
        counts[i] = len(targets)
    return nll_sums, counts


def token_statistics(model, tokenizer, encoded: Sequence[dict], batch_size: int, desc: str) -> list[dict]:
    """Per encoded example, float64 numpy arrays over its labelled tokens:

    * ``logp``: ``log p(x_t | x_<t)`` of every labelled token, the final EOS included;
    * over the labelled tokens but a final EOS (open-unlearning's token-wise metrics leave
      the EOS out): ``token_logp``, ``match`` (bool: greedy prediction == token), and the
      mean ``mu`` and variance ``var`` of ``log p(v | x_<t)`` under ``p(. | x_<t)``.
    """
    eos = tokenizer.eos_token_id
    stats_out = [None] * len(encoded)
    for i, logits, targets in labelled_logits(model, tokenizer, encoded, batch_size, desc):
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(1, targets[:, None])[:, 0]
        n = len(targets) - 1 if len(targets) and targets[-1].item() == eos else len(targets)
        p = logp_all[:n].exp()
        # Tokens of probability 0 (-inf logits) add 0, not NaN (0 * -inf).
        mu = torch.where(p > 0, p * logp_all[:n], 0.0).sum(-1)
        # sum p (log p - mu)^2 equals sum p (log p)^2 - mu^2 without its float32 cancellation.
        centered = torch.where(p > 0, logp_all[:n] - mu[:, None], 0.0)
        var = (p * centered ** 2).sum(-1)
        stats_out[i] = {
            "logp": logp.double().cpu().numpy(),
            "token_logp": logp[:n].double().cpu().numpy(),
            "match": (logits[:n].argmax(-1) == targets[:n]).cpu().numpy(),
            "mu": mu.double().cpu().numpy(),
            "var": var.double().cpu().numpy(),
        }
    return stats_out


def last_token_logprobs(model, tokenizer, prompt_ids: Sequence[list[int]], candidates: np.ndarray,
                        batch_size: int, desc: str = "last_token_logprobs") -> np.ndarray:
    """Log-probabilities (float64 ``[n, C]``) of the candidate next tokens (int ``[n, C]``
    token ids) after each prompt (``n`` lists of token ids), one forward pass per prompt."""
    encoded = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompt_ids]
    scores = np.zeros(candidates.shape, dtype=np.float64)
    # Left padding: the last position is every prompt's end.
    for indices, logits, _ in forward_batches(model, tokenizer, encoded, batch_size, desc, padding_side="left"):
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        rows = torch.as_tensor(candidates[indices], device=logprobs.device)
        scores[indices] = logprobs.gather(1, rows).double().cpu().numpy()
    return scores
