"""Token losses: the NLL, the inverted hinge loss and the Tsallis entropy of one logits
tensor, together.

The ALTER loss reads three functions of the same logits: the forget batch's IHL, the
retain batch's NLL, and both batches' entropy (the structural term, DESIGN.md §1).
Computed apart, each reads the [T, V] logits forward and writes its own [T, V] gradient
backward, which autograd then adds. Here, per token (``p = softmax(logits)``)::

    nll_t     = -log p_y                        (0 where the label is ignore_index)
    ihl_t     = 1 + p_y - max_{v≠y} p_v          (unweighted; 0 where ignored)
    weight_t  = inverted_hinge_loss's token weight (detached)
    entropy_t = S_q(p_t)                         (every token, ignored ones too)

with ``nll``, ``ihl`` and ``entropy`` differentiable, and the gradient of any combination
``g_N·nll + g_I·ihl + g_S·entropy`` is one row expression:

    Tsallis: dz = a p^q + b p + (g_I p_y - g_N) δ_y - g_I p_v* δ_v*,
             a = -g_S q/(q-1),  b = -a P_q + g_I (p_v* - p_y) + g_N
    Shannon: dz = p (-g_S (log p + H) + g_I (p_v* - p_y) + g_N) + the same δ terms.

Formulations:

- ``token_losses_eager``: the readable reference: ``F.cross_entropy``, the IHL's and the
  entropy's eager references; autograd does the backward.
- cpp (CPU): ``torch.ops.alter_kernels.token_losses_forward`` (one read of the logits:
  the IHL's row statistics and P_q) and ``token_losses_backward`` (one read, one write).
- triton: the IHL's forward kernel with P_q stored, and one backward kernel with the
  row expression above (one read, one write of [T, V]).
- cpp on CUDA: the composition of the per-op kernels (``inverted_hinge_loss``,
  ``tsallis_entropy``) and ``F.cross_entropy``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from alter_kernels._dispatch import KernelPair, device_guard, resolve_backend
from alter_kernels._triton import tl, triton
from alter_kernels._validation import check_row_max_finite, check_rows_finite_somewhere
from alter_kernels.entropy import (is_shannon, result_dtype, row_kernel_config, rows_with_unit_stride, tsallis_entropy,
                                   tsallis_entropy_eager)
from alter_kernels.ihl import (_ihl_forward_triton, check_ihl_inputs, inverted_hinge_loss, inverted_hinge_loss_eager,
                               token_weights)

_OP = "token_losses"


class TokenLosses(NamedTuple):
    """Per-token values [T] of :func:`token_losses` (see the module doc); nll, ihl and
    weight are None when not asked for."""

    nll: torch.Tensor | None
    ihl: torch.Tensor | None
    weight: torch.Tensor | None
    entropy: torch.Tensor


def token_losses_eager(logits, labels, q, threshold, high_entropy_weight, ignore_index, nll=True,
                       ihl=True) -> TokenLosses:
    """Readable reference of :func:`token_losses` (no checks; autograd does backward)."""
    z = logits.to(result_dtype(logits.dtype))
    nll = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none") if nll else None
    hinge, weight = (inverted_hinge_loss_eager(z, labels, q, threshold, high_entropy_weight, ignore_index)[::2] if ihl
                     else (None, None))
    return TokenLosses(nll, hinge, weight, tsallis_entropy_eager(z, q))


# --------------------------------------------------------------------------- triton

if triton is not None:
    from alter_kernels.entropy import entropy_grad_terms, softmax_block, store_block
    from alter_kernels.ihl import target_and_runner_up_probs

    @triton.jit
    def token_losses_grad_block(
        row_ptr, grad_row_ptr, offsets, start, V, label, runner_up, g_entropy, linear, at_label, at_runner_up,
        entropy, m, log_s, power_sum, q, SHANNON: tl.constexpr, MASKED: tl.constexpr,
    ):
        """A block of the combined gradient row: the entropy's terms, ``linear``·p (the
        IHL's and the NLL's), and the corrections at the label and the runner-up."""
        cols = start + offsets
        log_p, log2_p, p = softmax_block(row_ptr, cols, V, m, log_s, MASKED)
        d = entropy_grad_terms(log_p, log2_p, p, g_entropy, entropy, power_sum, q, SHANNON) + linear * p
        d += tl.where(offsets == label - start, at_label, 0.0) + tl.where(offsets == runner_up - start, at_runner_up, 0.0)
        store_block(grad_row_ptr, cols, V, d, MASKED)

    @triton.jit
    def _token_losses_backward_kernel(
        grad_nll_ptr, grad_ihl_ptr, grad_entropy_ptr, logits_ptr, logits_row_stride, labels_ptr, entropy_ptr,
        row_max_ptr, log_sum_ptr, power_sum_ptr, runner_up_ptr, grad_logits_ptr, grad_row_stride, V, q, ignore_index,
        SHANNON: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        grad_row_ptr = grad_logits_ptr + row * grad_row_stride
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        runner_up = tl.where(ignored, -1, tl.load(runner_up_ptr + row))
        m = tl.load(row_max_ptr + row)
        log_s = tl.load(log_sum_ptr + row)
        g_ihl = tl.where(ignored, 0.0, tl.load(grad_ihl_ptr + row))
        g_nll = tl.where(ignored, 0.0, tl.load(grad_nll_ptr + row))
        p_target, p_runner_up = target_and_runner_up_probs(row_ptr, label, ignored, runner_up, m, log_s)
        linear = g_ihl * (p_runner_up - p_target) + g_nll
        at_label, at_runner_up = g_ihl * p_target - g_nll, -g_ihl * p_runner_up
        label = tl.where(ignored, -1, label).to(tl.int32)  # int32 compares, as in the forward
        args = (tl.load(grad_entropy_ptr + row), linear, at_label, at_runner_up, tl.load(entropy_ptr + row), m, log_s,
                tl.load(power_sum_ptr + row), q)
        offsets = tl.arange(0, BLOCK_V)
        full = V - V % BLOCK_V  # whole blocks unmasked, then the masked tail
        for start in range(0, full, BLOCK_V):
            token_losses_grad_block(row_ptr, grad_row_ptr, offsets, start, V, label, runner_up, *args, SHANNON,
                                    MASKED=False)
        if full < V:
            token_losses_grad_block(row_ptr, grad_row_ptr, offsets, full, V, label, runner_up, *args, SHANNON,
                                    MASKED=True)


def _token_losses_forward_triton(logits, labels, q, threshold, high_entropy_weight, ignore_index):
    power_sum = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    loss, entropy, weight, row_max, log_sum, runner_up = _ihl_forward_triton(
        logits, labels, q, threshold, high_entropy_weight, ignore_index, power_sum)
    return loss, entropy, weight, row_max, log_sum, power_sum, runner_up


def _token_losses_backward_triton(grad_nll, grad_ihl, grad_entropy, logits, labels, entropy, row_max, log_sum,
                                  power_sum, runner_up, q, ignore_index):
    T, V = logits.shape
    grad_logits = torch.empty((T, V), dtype=logits.dtype, device=logits.device)
    if T:
        with device_guard(logits.device):
            _token_losses_backward_kernel[(T,)](
                grad_nll, grad_ihl, grad_entropy, logits, logits.stride(0), labels, entropy, row_max, log_sum,
                power_sum, runner_up, grad_logits, grad_logits.stride(0), V, q, ignore_index,
                SHANNON=is_shannon(q), **row_kernel_config(V),
            )
    return grad_logits


# --------------------------------------------------------------------------- cpp


def _token_losses_forward_cpp(logits, labels, q, threshold, high_entropy_weight, ignore_index):
    return torch.ops.alter_kernels.token_losses_forward(logits, labels, q, threshold, high_entropy_weight, ignore_index)


def _token_losses_backward_cpp(grad_nll, grad_ihl, grad_entropy, logits, labels, entropy, row_max, log_sum,
                               power_sum, runner_up, q, ignore_index):
    return torch.ops.alter_kernels.token_losses_backward(grad_nll, grad_ihl, grad_entropy, logits, labels, entropy,
                                                         row_max, log_sum, power_sum, runner_up, q, ignore_index)


# --------------------------------------------------------------------------- autograd

# Each kernel backend's forward/backward split (the C++ kernels are CPU-only).
TOKEN_LOSSES_KERNELS = {
    "cpp": KernelPair(_token_losses_forward_cpp, _token_losses_backward_cpp),
    "triton": KernelPair(_token_losses_forward_triton, _token_losses_backward_triton),
}


class TokenLossesFunction(torch.autograd.Function):
    """(nll, ihl, weight, entropy) [T] float32 of [T, V] logits (stride(-1) == 1) by a
    backend's kernels; nll, ihl and entropy differentiable in the logits."""

    @staticmethod
    def forward(ctx, logits, labels, q, threshold, high_entropy_weight, ignore_index, kernels: KernelPair):
        ihl, entropy, weight, row_max, log_sum, power_sum, runner_up = kernels.forward(
            logits, labels, q, threshold, high_entropy_weight, ignore_index)
        check_row_max_finite(_OP, row_max)
        ignored = labels == ignore_index
        label_logit = logits.gather(1, labels.masked_fill(ignored, 0)[:, None])[:, 0].float()
        # (m - z_y) + log s: z_y - m is exact, m + log s would round at the logits' magnitude
        nll = ((row_max - label_logit) + log_sum).masked_fill(ignored, 0.0)
        ctx.save_for_backward(logits, labels, entropy, row_max, log_sum, power_sum, runner_up)
        ctx.q, ctx.ignore_index, ctx.kernels = q, ignore_index, kernels
        ctx.mark_non_differentiable(weight)
        return nll, ihl, weight, entropy

    @staticmethod
    def backward(ctx, grad_nll, grad_ihl, _grad_weight, grad_entropy):
        logits, labels, entropy, row_max, log_sum, power_sum, runner_up = ctx.saved_tensors

        def upstream(grad):  # a loss that did not reach the output has no gradient
            return torch.zeros_like(entropy) if grad is None else grad.float().contiguous()

        grad_logits = ctx.kernels.backward(
            upstream(grad_nll), upstream(grad_ihl), upstream(grad_entropy), logits, labels, entropy, row_max, log_sum,
            power_sum, runner_up, ctx.q, ctx.ignore_index)
        return grad_logits, None, None, None, None, None, None


def token_losses(logits, labels, q, threshold, high_entropy_weight=0.0, ignore_index=-100, backend=None,
                 nll=True, ihl=True) -> TokenLosses:
    """The NLL, the inverted hinge loss and the entropy of every token (see the module doc).

    logits: [T, V] float16/bfloat16/float32/float64, any strides (-inf entries are masked
      vocabulary; a row of all -inf is an error). labels: [T] integer, each in [0, V) or
      ``ignore_index``. q, threshold, high_entropy_weight: as :func:`inverted_hinge_loss`.
    nll, ihl: False for a loss not wanted (its fields are then None; ``weight`` goes with
      ``ihl``): the backends that compute the losses apart skip it.
    Returns :class:`TokenLosses` of [T] float32 tensors (float64 for float64 logits); nll,
    ihl and entropy are differentiable in ``logits``.
    backend: "eager" | "triton" | "cpp" | None (see ``alter_kernels._dispatch``).
    """
    labels, q, threshold, high_entropy_weight, _ = check_ihl_inputs(
        _OP, logits, labels, q, threshold, high_entropy_weight, ignore_index, check_values=True)
    chosen = resolve_backend(_OP, backend, logits.device, ("eager", "triton", "cpp"))
    if chosen == "eager":
        check_rows_finite_somewhere(_OP, logits)
        return token_losses_eager(logits, labels, q, threshold, high_entropy_weight, ignore_index, nll, ihl)
    dtype = result_dtype(logits.dtype)
    if chosen == "triton" or logits.device.type == "cpu":  # the C++ kernels are CPU-only
        every = TokenLosses(*(value.to(dtype) for value in TokenLossesFunction.apply(
            rows_with_unit_stride(logits), labels.contiguous(), q, threshold, high_entropy_weight, ignore_index,
            TOKEN_LOSSES_KERNELS[chosen])))
        return every._replace(nll=every.nll if nll else None, ihl=every.ihl if ihl else None,
                              weight=every.weight if ihl else None)
    hinge = weight = None
    if ihl:  # threshold +inf: every token weight 1, so "none" gives the unweighted loss
        hinge, detached = inverted_hinge_loss(logits, labels, q, math.inf, 0.0, ignore_index, reduction="none",
                                              backend=chosen)
        weight = token_weights(detached, labels == ignore_index, threshold, high_entropy_weight)
    nll = F.cross_entropy(logits.to(dtype), labels, ignore_index=ignore_index, reduction="none") if nll else None
    return TokenLosses(nll, hinge, weight, tsallis_entropy(logits, q, backend=chosen))
