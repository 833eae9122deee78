"""The loss terms of the unlearning methods: token NLL, sequence log-probability, NPO,
and the structural term of eq. 8 (surrogate and exact)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alter.data import IGNORE_INDEX
from alter_kernels import tsallis_entropy


def shift_labels(logits: torch.Tensor, labels: torch.Tensor):
    """Logits at position t predict the label at t + 1: ``[B·L, V]`` and ``[B·L]``, the
    last position of each sample ignored. The labels move, not the logits, so that the
    logits stay a view (``logits[:, :-1]`` would copy all ``[T, V]`` of them)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens (``labels != -100``)."""
    flat_logits, flat_labels = shift_labels(logits, labels)
    return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities of the labelled tokens of each sample: ``[B]``."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(-1)


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al., 2024): ``-(2/beta) * mean log sigmoid(-beta * log(pi/pi_ref))``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob)).mean()


def _high_entropy_tokens(batch: dict, threshold: float) -> torch.Tensor:
    return (batch["entropy"] > threshold) & batch["attention_mask"].bool()


def structural_surrogate(logits, batch: dict, q: float, threshold: float, backend=None) -> torch.Tensor:
    """``E_H[(S_q^adapted - S_q^base)^2]`` over the high-entropy tokens H of the batch."""
    high = _high_entropy_tokens(batch, threshold)
    adapted = tsallis_entropy(logits, q, backend=backend)
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

