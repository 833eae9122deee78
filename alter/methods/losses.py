"""The loss terms of the unlearning methods: token NLL, sequence log-probability, NPO,
and the structural term of eq. 8 (surrogate and exact)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alter.data import IGNORE_INDEX
from alter_kernels import tsallis_entropy


def shift_targets(values: torch.Tensor, fill) -> torch.Tensor:
    """A per-token field ``[B, L]`` (labels, a forget floor) moved to the logits that predict
    it: ``[B·L]``, position t holding the value at t + 1, ``fill`` at each sample's end."""
    return F.pad(values[:, 1:], (0, 1), value=fill).reshape(-1)


def shift_labels(logits: torch.Tensor, labels: torch.Tensor):
    """Logits at position t predict the label at t + 1: ``[B·L, V]`` and ``[B·L]``, the
    last position of each sample ignored. The labels move, not the logits, so that the
    logits stay a view (``logits[:, :-1]`` would copy all ``[T, V]`` of them)."""
    return logits.reshape(-1, logits.shape[-1]), shift_targets(labels, IGNORE_INDEX)


def labelled_rows(logits: torch.Tensor, labels: torch.Tensor, dtype=None):
    """The logits rows that predict a labelled target, in ``dtype`` (default: float32, float64
    kept), ``[n, V]``; their log-probabilities of the targets ``[n]``; the targets ``[n]``;
    and the bool mask ``[B·L]`` of those rows in :func:`shift_labels`' flat order. Only the
    n labelled rows are converted and normalized, not all ``B·L`` (a full float copy of
    the logits for a per-token choice would undo what the fused losses save)."""
    flat_logits, flat_labels = shift_labels(logits, labels)
    keep = flat_labels != IGNORE_INDEX
    dtype = torch.promote_types(logits.dtype, torch.float32) if dtype is None else dtype
    rows, targets = flat_logits[keep].to(dtype), flat_labels[keep]
    return rows, torch.log_softmax(rows, -1).gather(-1, targets[:, None])[:, 0], targets, keep


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens (``labels != -100``); 0 for a batch with
    none (the forget floor can leave one so: a mean over no token would be NaN)."""
    flat_logits, flat_labels = shift_labels(logits, labels)
    total = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat_labels != IGNORE_INDEX).sum().clamp_min(1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities of the labelled tokens of each sample: ``[B]``
    float32 (:func:`token_logprobs` of the float32 logits)."""
    return token_logprobs(logits.float(), labels)[0].sum(-1)


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al., 2024): ``-(2/beta) * mean log sigmoid(-beta * log(pi/pi_ref))``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob)).mean()


def _high_entropy_tokens(batch: dict, threshold: float) -> torch.Tensor:
    return (batch["entropy"] > threshold) & batch["attention_mask"].bool()


def structural_surrogate(logits, batch: dict, q: float, threshold: float, backend=None) -> torch.Tensor:
    """``E_H[(S_q^adapted - S_q^base)^2]`` over the high-entropy tokens H of the batch."""
    return entropy_drift(tsallis_entropy(logits, q, backend=backend), batch, threshold)


def entropy_drift(adapted: torch.Tensor, batch: dict, threshold: float) -> torch.Tensor:
    """:func:`structural_surrogate` from the adapted model's entropy [B, L]."""
    high = _high_entropy_tokens(batch, threshold)
    # A masked mean, not [high].mean(): no host sync, and 0 when H is empty.
    return ((adapted - batch["entropy"]) ** 2 * high).sum() / high.sum().clamp_min(1)


def structural_exact(logits, batch: dict, q: float, threshold: float, A_params) -> torch.Tensor:
    """``E_H[||grad_A S_q(x_t)||^2]`` (eq. 8): one double-backward per high-entropy token."""
    high = _high_entropy_tokens(batch, threshold)
    if not high.any():
        return logits.new_zeros((), dtype=torch.float32)
    adapted = tsallis_entropy(logits, q, backend="eager")
    positions = high.nonzero().tolist()
    total = 0.0
    for b, t in positions:
        grads = torch.autograd.grad(adapted[b, t], A_params, create_graph=True, allow_unused=True)
        total = total + sum((g.to(torch.promote_types(g.dtype, torch.float32)) ** 2).sum() for g in grads if g is not None)
    return total / len(positions)


def _floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's scalar losses as floats, read with one device-to-host copy (each
    ``.item()`` would stall the host until the device drains its queue)."""
    values = torch.stack([value.float() for value in logs.values()]).tolist()
    return dict(zip(logs, values))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probability of each target and which targets are labelled: ``[B, L-1]``
    in float32 (float64 for float64 logits), 0 where unlabelled, and the bool mask ``[B, L-1]``.
    ``logits`` ``[B, L, V]``, ``labels`` ``[B, L]`` int64 (not shifted, -100 unlabelled)."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    labelled = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * labelled, labelled


def weighted_ascent(logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """Gradient ascent with each labelled token's NLL weighted by ``p^beta1 (1-p)^beta2``,
    ``p`` its probability, the weight a constant (no gradient): ``-mean_t w_t NLL_t`` over the
    labelled targets. WGA is ``beta2 = 0`` (Wang et al., 2025); SatImp both (Yang et al., 2025)."""
    logp, labelled = token_logprobs(logits, labels)
    p = logp.detach().exp()
    weight = p ** beta1 * (1 - p) ** beta2
    return (weight * logp * labelled).sum() / labelled.sum().clamp_min(1)
