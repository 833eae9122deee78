"""Entropy-weighted inverted hinge loss (IHL, DESIGN.md §1).

Per token with target y and ``p = softmax(logits)``: ``L = 1 + p_y - max_{v≠y} p_v``
(in [0, 2]). Token weights: 0 where the label is ``ignore_index``, 1 where the token's
Tsallis entropy is <= threshold, ``high_entropy_weight`` above it.

Backends: eager (reference, plain PyTorch autograd), triton, cpp. The kernel backends
share one split the autograd Function uses:

- ``forward(logits, labels, q, threshold, high_entropy_weight, ignore_index)``
  -> ``(loss [T] unweighted, entropy [T], weight [T], row_max [T], log_sum [T], runner_up [T] int32)``,
  one read of the logits; ``runner_up`` is v* = argmax_{v≠y} z_v, saved so that the
  backward needs no search (-1 for ignored tokens and when every other logit is -inf);
- ``backward(grad_loss, logits, labels, row_max, log_sum, runner_up, ignore_index) -> grad_logits``,
  one read and one write of the logits, with ``grad_loss`` already holding the token
  weights and the mean's 1/Σw.

Probabilities are ``p = exp((z - m) - log s)`` with the row max ``m`` and
``log s = log Σ e^{z - m}`` kept apart (see ``alter_kernels.entropy``): exact for logits of
any magnitude, so ties stay ties.

Ties for v* go to the lowest index on every backend.
"""
from __future__ import annotations

import math

import torch

from alter_kernels._dispatch import KernelPair, device_guard, resolve_backend
from alter_kernels._triton import tl, triton
from alter_kernels._validation import check_row_max_finite, check_rows_finite_somewhere, check_same_device, check_tensor
from alter_kernels.entropy import (
    check_logits,
    check_q,
    is_shannon,
    result_dtype,
    row_kernel_config,
    rows_with_unit_stride,
    tsallis_entropy_eager,
)

REDUCTIONS = ("mean", "sum", "none")
INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def token_weights(entropy, ignored, threshold: float, high_entropy_weight: float):
    """w_t: 0 for ignored tokens, 1 for entropy <= threshold, high_entropy_weight above."""
    weight = torch.where(entropy <= threshold, 1.0, high_entropy_weight).to(entropy.dtype)
    return weight.masked_fill(ignored, 0.0)


def reduce_weighted(loss, weight, reduction: str):
    """Apply the token weights and the reduction; the mean over Σw == 0 is exactly 0."""
    weighted = loss * weight
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    total = weight.sum()
    return weighted.sum() / torch.where(total > 0, total, torch.ones_like(total))


# --------------------------------------------------------------------------- eager


def inverted_hinge_loss_eager(logits, labels, q, threshold, high_entropy_weight, ignore_index):
    """Reference: (unweighted loss [T], entropy [T] detached, weight [T]), plain PyTorch."""
    z = logits.to(result_dtype(logits.dtype))
    ignored = labels == ignore_index
    target = labels.masked_fill(ignored, 0)[:, None]
    p = torch.softmax(z, dim=-1)
    p_target = p.gather(1, target)[:, 0]
    # v* = argmax over v != y (first of ties). When every other logit is -inf it lands on a
    # word with p = 0 or on y, whose probability is zeroed here: the max over no word is 0.
    runner_up = z.scatter(1, target, float("-inf")).argmax(dim=1, keepdim=True)
    p_runner_up = p.scatter(1, target, 0.0).gather(1, runner_up)[:, 0]
    loss = (1.0 + p_target - p_runner_up).masked_fill(ignored, 0.0)
    entropy = tsallis_entropy_eager(z.detach(), q)
    return loss, entropy, token_weights(entropy, ignored, threshold, high_entropy_weight)


# --------------------------------------------------------------------------- triton

if triton is not None:
    from alter_kernels.entropy import (
        LOG2E, entropy_from_stats, exp2_ftz, load_logits, online_entropy_update, store_block,
    )

    @triton.jit
    def runner_up_update(z, offsets, start, label, best, best_start):
        """Per lane, the largest logit seen so far in a column other than ``label`` and the
        start of its block (column = start + offset; strictly greater: a tie keeps the
        earlier column; -1 while all are -inf). Offsets against ``label - start`` spare a
        per-element add of the column."""
        other = tl.where(offsets == label - start, float("-inf"), z)
        better = other > best
        return tl.where(better, other, best), tl.where(better, start, best_start)

    @triton.jit
    def _ihl_forward_kernel(
        logits_ptr, logits_row_stride, labels_ptr,
        loss_ptr, entropy_ptr, weight_ptr, row_max_ptr, log_sum_ptr, runner_up_ptr, power_sum_ptr,
        V, q, threshold, high_entropy_weight, ignore_index,
        SHANNON: tl.constexpr, BLOCK_V: tl.constexpr, STORE_POWER_SUM: tl.constexpr,
    ):
        """One row's IHL statistics; with STORE_POWER_SUM its P_q too (token_losses)."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        # Column compares in int32 (V < 2^31); an ignored token excludes no column.
        label = tl.where(ignored, -1, label).to(tl.int32)
        offsets = tl.arange(0, BLOCK_V)
        m = float("-inf")
        s = tl.zeros([BLOCK_V], tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_start = tl.full([BLOCK_V], -1, tl.int32)
        full = V - V % BLOCK_V  # whole blocks unmasked, then the masked tail
        for start in range(0, full, BLOCK_V):
            z = load_logits(row_ptr, start + offsets, V, MASKED=False)
            m, s, acc = online_entropy_update(z, m, s, acc, q, SHANNON)
            best, best_start = runner_up_update(z, offsets, start, label, best, best_start)
        if full < V:
            z = load_logits(row_ptr, full + offsets, V, MASKED=True)
            m, s, acc = online_entropy_update(z, m, s, acc, q, SHANNON)
            best, best_start = runner_up_update(z, offsets, full, label, best, best_start)
        entropy, log_s, power_sum = entropy_from_stats(s, acc, q, SHANNON)
        if STORE_POWER_SUM:
            tl.store(power_sum_ptr + row, power_sum)
        # v*: the lowest column among the lanes holding the max (-1 when all are -inf)
        top = tl.max(best, axis=0)
        runner_up = tl.min(tl.where(best == top, tl.where(best_start < 0, -1, best_start + offsets), V), axis=0)
        # exp((z - m) - log s) as in the backward, not exp(z - lse): lse = m + log s is
        # rounded at the logits' magnitude.
        p_target = exp2_ftz(((tl.load(row_ptr + tl.maximum(label, 0)).to(tl.float32) - m) - log_s) * LOG2E)
        p_runner_up = exp2_ftz(((top - m) - log_s) * LOG2E)
        weight = tl.where(entropy <= threshold, 1.0, high_entropy_weight)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, 1.0 + p_target - p_runner_up))
        tl.store(entropy_ptr + row, entropy)
        tl.store(weight_ptr + row, tl.where(ignored, 0.0, weight))
        tl.store(row_max_ptr + row, m)
        tl.store(log_sum_ptr + row, log_s)
        tl.store(runner_up_ptr + row, tl.where(ignored, -1, runner_up))

    @triton.jit
    def target_and_runner_up_probs(row_ptr, label, ignored, runner_up, m, log_s):
        """(p_y, p_v*) of a row from its saved statistics (p_v* = 0 without a runner-up)."""
        # p = exp((z - m) - log s): z - m is exact (see the module docstring)
        p_target = exp2_ftz(((tl.load(row_ptr + tl.where(ignored, 0, label)).to(tl.float32) - m) - log_s) * LOG2E)
        p_runner_up = tl.where(
            runner_up >= 0,
            exp2_ftz(((tl.load(row_ptr + tl.maximum(runner_up, 0)).to(tl.float32) - m) - log_s) * LOG2E),
            0.0,
        )
        return p_target, p_runner_up

    @triton.jit
    def ihl_grad_block(
        row_ptr, grad_row_ptr, offsets, start, V, label, runner_up, grad, m, log_s, p_target, p_runner_up,
        MASKED: tl.constexpr,
    ):
        """grad · dL/dz of the block of columns start + offsets into the gradient row:
        dL/dz_j = p_y(δ_jy - p_j) - p_v*(δ_jv* - p_j), p = exp((z - m) - log s) (z - m exact)."""
        cols = start + offsets
        p = exp2_ftz(((load_logits(row_ptr, cols, V, MASKED) - m) - log_s) * LOG2E)
        d = (p_runner_up - p_target) * p
        d += tl.where(offsets == label - start, p_target, 0.0) - tl.where(offsets == runner_up - start, p_runner_up, 0.0)
        store_block(grad_row_ptr, cols, V, grad * d, MASKED)

    @triton.jit
    def _ihl_backward_kernel(
        grad_loss_ptr, logits_ptr, logits_row_stride, labels_ptr, row_max_ptr, log_sum_ptr, runner_up_ptr,
        grad_logits_ptr, grad_row_stride, V, ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        grad_row_ptr = grad_logits_ptr + row * grad_row_stride
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        runner_up = tl.load(runner_up_ptr + row)
        m = tl.load(row_max_ptr + row)
        log_s = tl.load(log_sum_ptr + row)
        grad = tl.where(ignored, 0.0, tl.load(grad_loss_ptr + row))
        p_target, p_runner_up = target_and_runner_up_probs(row_ptr, label, ignored, runner_up, m, log_s)
        label = tl.where(ignored, -1, label).to(tl.int32)  # int32 compares, as in the forward
        offsets = tl.arange(0, BLOCK_V)
        full = V - V % BLOCK_V  # whole blocks unmasked, then the masked tail
        for start in range(0, full, BLOCK_V):
            ihl_grad_block(
                row_ptr, grad_row_ptr, offsets, start, V, label, runner_up, grad, m, log_s, p_target, p_runner_up,
                MASKED=False,
            )
        if full < V:
            ihl_grad_block(
                row_ptr, grad_row_ptr, offsets, full, V, label, runner_up, grad, m, log_s, p_target, p_runner_up,
                MASKED=True,
            )


def _ihl_forward_triton(logits, labels, q, threshold, high_entropy_weight, ignore_index, power_sum=None):
    """The IHL's forward outputs; with ``power_sum`` (a [T] float32 tensor) P_q is stored in it."""
    T, V = logits.shape
    loss, entropy, weight, row_max, log_sum = (torch.empty(T, dtype=torch.float32, device=logits.device) for _ in range(5))
    runner_up = torch.empty(T, dtype=torch.int32, device=logits.device)
    if T:
        with device_guard(logits.device):
            _ihl_forward_kernel[(T,)](
                logits, logits.stride(0), labels, loss, entropy, weight, row_max, log_sum, runner_up,
                loss if power_sum is None else power_sum, V, q, threshold, high_entropy_weight, ignore_index,
                SHANNON=is_shannon(q), STORE_POWER_SUM=power_sum is not None, **row_kernel_config(V),
            )
    return loss, entropy, weight, row_max, log_sum, runner_up


def _ihl_backward_triton(grad_loss, logits, labels, row_max, log_sum, runner_up, ignore_index):
    T, V = logits.shape
    grad_logits = torch.empty((T, V), dtype=logits.dtype, device=logits.device)
    if T:
        with device_guard(logits.device):
            _ihl_backward_kernel[(T,)](
                grad_loss, logits, logits.stride(0), labels, row_max, log_sum, runner_up, grad_logits, grad_logits.stride(0),
                V, ignore_index, **row_kernel_config(V),
            )
    return grad_logits


# --------------------------------------------------------------------------- cpp


def _ihl_forward_cpp(logits, labels, q, threshold, high_entropy_weight, ignore_index):
    return torch.ops.alter_kernels.ihl_forward(logits, labels, q, threshold, high_entropy_weight, ignore_index)


def _ihl_backward_cpp(grad_loss, logits, labels, row_max, log_sum, runner_up, ignore_index):
    return torch.ops.alter_kernels.ihl_backward(grad_loss, logits, labels, row_max, log_sum, runner_up, ignore_index)


# --------------------------------------------------------------------------- autograd

# Each kernel backend's forward/backward split (see the module docstring).
IHL_KERNELS = {
    "triton": KernelPair(_ihl_forward_triton, _ihl_backward_triton),
    "cpp": KernelPair(_ihl_forward_cpp, _ihl_backward_cpp),
}


class InvertedHingeLossFunction(torch.autograd.Function):
    """(unweighted loss [T], entropy [T], weight [T]) of [T, V] logits (stride(-1) == 1)
    through a backend's kernels; only the loss is differentiable."""

    @staticmethod
    def forward(ctx, logits, labels, q, threshold, high_entropy_weight, ignore_index, kernels: KernelPair, check_values):
        loss, entropy, weight, row_max, log_sum, runner_up = kernels.forward(
            logits, labels, q, threshold, high_entropy_weight, ignore_index
        )
        if check_values:
            check_row_max_finite("inverted_hinge_loss", row_max)
        ctx.save_for_backward(logits, labels, row_max, log_sum, runner_up)
        ctx.ignore_index, ctx.kernels = ignore_index, kernels
        ctx.mark_non_differentiable(entropy, weight)
        return loss, entropy, weight

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, grad_weight):
        logits, labels, row_max, log_sum, runner_up = ctx.saved_tensors
        grad_loss = grad_loss.to(log_sum.dtype).contiguous()
        grad_logits = ctx.kernels.backward(grad_loss, logits, labels, row_max, log_sum, runner_up, ctx.ignore_index)
        return grad_logits, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public op


def _check_number(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def inverted_hinge_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    q: float,
    threshold: float,
    high_entropy_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    check_values: bool = True,
):
    """Entropy-weighted inverted hinge loss and the per-token entropy that gates it.

    logits: [T, V] float16/bfloat16/float32/float64, any strides (-inf entries are masked
      vocabulary; a row of all -inf is an error). labels: [T] integer, each in [0, V) or
      ``ignore_index``.
    Token t: ``L_t = 1 + p_y - max_{v≠y} p_v`` (the max over no other entry is 0), weight
    ``w_t`` = 0 if ignored, 1 if its Tsallis-q entropy ``S_t <= threshold``, else
    ``high_entropy_weight`` (finite, >= 0; threshold: any number but NaN).
    reduction: "mean" -> Σ w_t L_t / Σ w_t (exactly 0, with zero gradient, when Σ w_t == 0);
      "sum" -> Σ w_t L_t; "none" -> [T] w_t L_t.
    check_values: raise ValueError for a label outside [0, V) (not ignore_index) or a row
      of all -inf (host syncs on a GPU). With False no device value is read on the host
      (CUDA-graph capture): such a token gets a NaN loss, so the mean and sum are NaN, on
      every backend (an out-of-range label is never used as an index).
    Returns ``(loss, entropy)``: loss float32 (float64 for float64 logits), differentiable
    in ``logits``; entropy [T] of the same dtype, detached.
    """
    op = "inverted_hinge_loss"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    labels, q, threshold, high_entropy_weight, out_of_range = check_ihl_inputs(
        op, logits, labels, q, threshold, high_entropy_weight, ignore_index, check_values)
    backend = resolve_backend(op, backend, logits.device, ("eager", "triton", "cpp"))
    if backend == "eager":
        if check_values:
            check_rows_finite_somewhere(op, logits)
        loss, entropy, weight = inverted_hinge_loss_eager(logits, labels, q, threshold, high_entropy_weight, ignore_index)
    else:
        loss, entropy, weight = InvertedHingeLossFunction.apply(
            rows_with_unit_stride(logits), labels.contiguous(), q, threshold, high_entropy_weight, ignore_index,
            IHL_KERNELS[backend], check_values,
        )
        dtype = result_dtype(logits.dtype)
        loss, entropy, weight = loss.to(dtype), entropy.to(dtype), weight.to(dtype)
    if not check_values:
        loss = loss.masked_fill(out_of_range, float("nan"))
    return reduce_weighted(loss, weight, reduction), entropy


def check_ihl_inputs(op, logits, labels, q, threshold, high_entropy_weight, ignore_index, check_values):
    """The checks of :func:`inverted_hinge_loss`'s arguments; returns (labels as int64, q,
    threshold, high_entropy_weight, the out-of-range labels [T] bool). With check_values
    False an out-of-range label is replaced by ignore_index (never used as an index)."""
    check_logits(op, logits, ndim=2)
    check_tensor(op, "labels", labels, dtypes=INTEGER_DTYPES)
    T, V = logits.shape
    if tuple(labels.shape) != (T,):
        raise ValueError(f"{op}: labels must have shape [T] = ({T},) to match logits, got {tuple(labels.shape)}")
    check_same_device(op, logits=logits, labels=labels)
    q = check_q(op, q)
    threshold = _check_number(op, "threshold", threshold)
    high_entropy_weight = _check_number(op, "high_entropy_weight", high_entropy_weight)
    if math.isnan(threshold):
        raise ValueError(f"{op}: threshold must not be NaN (±inf are allowed: every token high / low)")
    if not high_entropy_weight >= 0:
        raise ValueError(f"{op}: high_entropy_weight must be >= 0, got {high_entropy_weight}")
    if math.isinf(high_entropy_weight):
        raise ValueError(f"{op}: high_entropy_weight must be finite, got {high_entropy_weight}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = labels.long()
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if check_values and bool(out_of_range.any()):
        bad = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"{op}: labels must be in [0, {V}) or ignore_index={ignore_index}; labels[{bad}] = {int(labels[bad])}"
        )
    if not check_values:  # never index with a bad label; its token's loss is NaN
        labels = labels.masked_fill(out_of_range, ignore_index)
    return labels, q, threshold, high_entropy_weight, out_of_range
