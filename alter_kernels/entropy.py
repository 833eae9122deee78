"""Token entropy of the softmax of logits: Tsallis ``S_q`` and Shannon ``H`` (q == 1).

``tsallis_entropy(logits, q)``: ``[..., V]`` logits -> ``[...]`` entropy.
``fused_linear_entropy(hidden, weight, q)``: entropy of ``softmax(hidden @ weight.T)``
without holding all ``[T, V]`` logits at once.

Backends (DESIGN.md §1-2):

- eager: the reference, plain PyTorch autograd (twice differentiable, which the exact
  structural term of the ALTER loss needs);
- triton: one program per row, one pass over the row with an online softmax in the log2
  domain (``ex2.approx.ftz`` on a GPU), per-lane sums and one reduction per block (the max);
  below SPLIT_V_MAX_ROWS rows (decode) the forward splits each row over several programs
  and merges their partial stats (split-V);
- cpp: ``torch.ops.alter_kernels.entropy_forward / entropy_backward``.

Every backend also offers the split the autograd Functions use,
``forward(logits [T, V], q) -> (entropy [T], row_max [T], log_sum [T], power_sum [T])`` and
``backward(grad_entropy [T], logits, entropy, row_max, log_sum, power_sum, q) -> grad_logits [T, V]``:
the forward saves per row the max ``m``, ``log s = log Σ e^{z - m}`` and
``P_q = Σ p^q`` (1 for Shannon), and the backward rebuilds ``p = exp((z - m) - log s)``.
What is saved is what keeps the gradient exact in float32: ``z - m`` is exact, while one
saved ``lse = m + log s`` would be rounded at the logits' magnitude (at |z| ~ 1e4 a
relative error ~1e-3 in every p); ``P_q`` rebuilt as ``1 - (q - 1)·S`` from the float32
entropy would lose ``(q - 1)·ulp(S)/P_q`` (1e-4 for near-uniform rows of 32k words at q = 2).

Entropy is float32 (float64 for float64 logits; triton and cpp then still accumulate in
float32, the eager path in float64).
"""
from __future__ import annotations

import math

import torch

from alter_kernels._dispatch import KernelPair, device_guard, resolve_backend
from alter_kernels._triton import INTERPRETED, tl, triton
from alter_kernels._validation import (
    FLOAT_DTYPES,
    check_row_max_finite,
    check_rows_finite_somewhere,
    check_same_device,
    check_tensor,
)

# Below this distance from 1 the Tsallis formula (1 - Σp^q)/(q - 1) cancels badly; use Shannon.
SHANNON_TOLERANCE = 1e-3
# Logits elements per chunk of fused_linear_entropy by default: 256 MiB of bf16 logits
# (512 MiB in fp32; 1024 tokens of Llama-3's vocabulary); the backward holds a chunk's
# logits and their gradient.
DEFAULT_CHUNK_ELEMENTS = 2**27
# Default chunks are whole multiples of this many tokens (GEMM tiles of 128/256 rows).
CHUNK_ROWS = 256
# Split-V (decode, small chunks): below SPLIT_V_MAX_ROWS rows, a (T,) grid is under two
# CTAs per SM of an H100/H200 (132 SMs); the triton forward then splits each row over
# several programs (~SPLIT_V_PROGRAMS in all) and merges their partial stats.
SPLIT_V_MAX_ROWS = 256
SPLIT_V_PROGRAMS = 1024
# Rows of grad_weight per float32 product in the fused backward (a 128 MiB temporary at D 4096).
WEIGHT_GRAD_SLAB = 8192


def is_shannon(q: float) -> bool:
    """Whether ``q`` is treated as 1 (Shannon entropy)."""
    return abs(q - 1.0) < SHANNON_TOLERANCE


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of entropies and losses computed from logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_q(op: str, q) -> float:
    """Return ``q`` as a float; raise unless it is a finite number > 0."""
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"{op}: q must be a number, got {type(q).__name__}")
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"{op}: q must be a finite number > 0, got {q}")
    return float(q)


def check_logits(op: str, logits, *, ndim: int | None = None) -> None:
    """Raise TypeError/ValueError unless ``logits`` is a float tensor with a non-empty last dim."""
    check_tensor(op, "logits", logits, ndim=ndim, min_ndim=1, dtypes=FLOAT_DTYPES)
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty vocabulary (last) dimension, got shape {tuple(logits.shape)}")


def rows_with_unit_stride(logits: torch.Tensor) -> torch.Tensor:
    """View ``[..., V]`` logits as ``[T, V]`` with stride(-1) == 1, copying only if needed."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        rows = rows.contiguous()
    return rows


# --------------------------------------------------------------------------- eager


def tsallis_entropy_eager(logits: torch.Tensor, q: float) -> torch.Tensor:
    """Reference: entropy of ``softmax(logits)`` over the last dim, in plain PyTorch.

    logits [..., V] any float dtype -> [...] float32 (float64 for float64 logits).
    """
    z = logits.to(result_dtype(logits.dtype))
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    if is_shannon(q):
        # Masked (-inf) logits have p = 0 and contribute 0; 0 * log 0 would be nan.
        return -(p * log_p.masked_fill(z == float("-inf"), 0.0)).sum(-1)
    return (1.0 - (q * log_p).exp().sum(-1)) / (q - 1.0)


def row_max_and_log_sum(z: torch.Tensor):
    """(m, log Σ e^{z - m}) per row of [T, V] logits (m = -inf for rows of all -inf)."""
    row_max = z.amax(dim=-1)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # -inf - (-inf) would be nan
    return row_max, torch.log(torch.exp(z - shift[:, None]).sum(-1))


def _entropy_forward_eager(logits: torch.Tensor, q: float):
    """Eager version of the kernel forward: (entropy, row_max, log_sum, power_sum), each [T]."""
    z = logits.to(result_dtype(logits.dtype))
    row_max, log_sum = row_max_and_log_sum(z)
    if is_shannon(q):
        power_sum = torch.ones_like(log_sum)
    else:
        power_sum = torch.exp(q * ((z - row_max[:, None]) - log_sum[:, None])).sum(-1)
    return tsallis_entropy_eager(z, q), row_max, log_sum, power_sum


def _entropy_backward_eager(grad_entropy, logits, entropy, row_max, log_sum, power_sum, q):
    """Eager version of the kernel backward, from the closed forms of DESIGN.md §1:
    dS/dz_j = -q/(q-1)·(p_j^q - p_j·P_q), dH/dz_j = -p_j(log p_j + H)."""
    z = logits.to(result_dtype(logits.dtype))
    log_p = (z - row_max[:, None]) - log_sum[:, None]
    p = log_p.exp()
    if is_shannon(q):
        grad = -p * (log_p.masked_fill(z == float("-inf"), 0.0) + entropy[:, None])
    else:
        grad = -q / (q - 1.0) * ((q * log_p).exp() - p * power_sum[:, None])
    return (grad_entropy[:, None] * grad).to(logits.dtype)


# --------------------------------------------------------------------------- triton

if triton is not None:
    # log2(e) and ln(2): the kernels work in the log2 domain, where exp is one MUFU.EX2.
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)
    # Floor of the x·2^x terms: a masked logit has x = -inf and 2^x = 0; 0·(-inf) would be nan.
    X_FLOOR = tl.constexpr(-3.0e38)

    if INTERPRETED:

        @triton.jit
        def exp2_ftz(x):
            """2^x of fp32 ``x`` (the interpreter has no inline PTX)."""
            return tl.math.exp2(x)

    else:

        @triton.jit
        def exp2_ftz(x):
            """2^x of fp32 ``x`` as one ``ex2.approx.ftz``: results below 2^-126 flush to 0,
            which moves no float32 sum of probabilities, while ``tl.exp`` pays a
            denormal fix-up of 3-4 instructions per element."""
            return tl.inline_asm_elementwise(
                "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
            )

    @triton.jit
    def load_logits(row_ptr, cols, V, MASKED: tl.constexpr):
        """A block of a row's logits as fp32; columns >= V read as -inf when MASKED (the
        tail), and unmasked whole blocks load as 16-byte vectors with no compare."""
        if MASKED:
            return tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        return tl.load(row_ptr + cols).to(tl.float32)

    @triton.jit
    def rescale_stats(m, shift, s, acc, q, SHANNON: tl.constexpr):
        """Re-express stats (s, acc) relative to the max m in the log2 domain relative to
        ``shift`` >= m, as SoftmaxStats::rescale of csrc/softmax_stats.h does: with
        d = (m - shift)·log2(e), s·2^d, and acc·2^{q·d} (Tsallis) or 2^d(acc + d·s)
        (Shannon). m = -inf (no finite logit yet: s = acc = 0) gives 0, not nan."""
        d = (m - shift) * LOG2E
        alpha = exp2_ftz(d)
        if SHANNON:
            acc = alpha * (acc + tl.where(m == float("-inf"), 0.0, d) * s)
        else:
            acc = exp2_ftz(q * d) * acc
        return alpha * s, acc

    @triton.jit
    def online_entropy_update(z, m, s, acc, q, SHANNON: tl.constexpr):
        """Fold a block ``z`` [BLOCK_V] of fp32 logits (-inf where masked) into the running
        row stats, with one reduction per block (the max).

        m: running row max (a scalar). Per lane, with x = (z - m)·log2(e):
        s = Σ 2^x, and acc = Σ 2^{q·x} (Tsallis) or Σ 2^x·x (Shannon).
        """
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit so far is -inf, shift by 0: -inf - (-inf) would be nan.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Branch-free: once the max is found d = 0, and the rescale makes FFMAs of the sums.
        s, acc = rescale_stats(m, shift, s, acc, q, SHANNON)
        x = (z - shift) * LOG2E
        e = exp2_ftz(x)
        if SHANNON:
            acc += e * tl.maximum(x, X_FLOOR)
        else:
            acc += exp2_ftz(q * x)
        return m_new, s + e, acc

    @triton.jit
    def row_entropy_stats(row_ptr, start, end, q, SHANNON: tl.constexpr, BLOCK_V: tl.constexpr):
        """Running max m and per-lane (s, acc) [BLOCK_V] of columns [start, end) of a row
        (start a multiple of BLOCK_V): whole blocks unmasked, then the masked tail."""
        offsets = tl.arange(0, BLOCK_V)
        m = float("-inf")
        s = tl.zeros([BLOCK_V], tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)
        full = end - (end - start) % BLOCK_V
        for col in range(start, full, BLOCK_V):
            z = load_logits(row_ptr, col + offsets, end, MASKED=False)
            m, s, acc = online_entropy_update(z, m, s, acc, q, SHANNON)
        if full < end:
            z = load_logits(row_ptr, full + offsets, end, MASKED=True)
            m, s, acc = online_entropy_update(z, m, s, acc, q, SHANNON)
        return m, s, acc

    @triton.jit
    def entropy_from_stats(s, acc, q, SHANNON: tl.constexpr):
        """(entropy, log s, P_q = Σ p^q (1 for Shannon)) of a row from its per-lane
        online stats (the row's one final reduction of s and acc)."""
        s = tl.sum(s, axis=0)
        acc = tl.sum(acc, axis=0)
        log_s = tl.log(s)
        if SHANNON:
            entropy = log_s - LN2 * (acc / s)
            power_sum = 1.0
        else:
            power_sum = acc * tl.exp(-q * log_s)  # u / s^q
            entropy = (1.0 - power_sum) / (q - 1.0)
        return entropy, log_s, power_sum

    @triton.jit
    def store_entropy_outputs(row, s, acc, m, entropy_ptr, row_max_ptr, log_sum_ptr, power_sum_ptr, q, SHANNON: tl.constexpr):
        entropy, log_s, power_sum = entropy_from_stats(s, acc, q, SHANNON)
        tl.store(entropy_ptr + row, entropy)
        tl.store(row_max_ptr + row, m)
        tl.store(log_sum_ptr + row, log_s)
        tl.store(power_sum_ptr + row, power_sum)

    @triton.jit
    def _entropy_forward_kernel(
        logits_ptr, logits_row_stride, entropy_ptr, row_max_ptr, log_sum_ptr, power_sum_ptr, V, q,
        SHANNON: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        m, s, acc = row_entropy_stats(logits_ptr + row * logits_row_stride, 0, V, q, SHANNON, BLOCK_V)
        store_entropy_outputs(row, s, acc, m, entropy_ptr, row_max_ptr, log_sum_ptr, power_sum_ptr, q, SHANNON)

    @triton.jit
    def _entropy_split_kernel(
        logits_ptr, logits_row_stride, part_max_ptr, part_sum_ptr, part_acc_ptr, V, split_cols, q,
        SHANNON: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Split-V forward, step 1: program (row, j) reduces columns [j·split_cols,
        (j+1)·split_cols) of its row to (m, s, acc) at [row, j] of the [T, splits] partials."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        start = split * split_cols
        m, s, acc = row_entropy_stats(
            logits_ptr + row * logits_row_stride, start, tl.minimum(V, start + split_cols), q, SHANNON, BLOCK_V
        )
        at = row * tl.num_programs(1) + split
        tl.store(part_max_ptr + at, m)
        tl.store(part_sum_ptr + at, tl.sum(s, axis=0))
        tl.store(part_acc_ptr + at, tl.sum(acc, axis=0))

    @triton.jit
    def _entropy_merge_kernel(
        part_max_ptr, part_sum_ptr, part_acc_ptr, entropy_ptr, row_max_ptr, log_sum_ptr, power_sum_ptr, splits, q,
        SHANNON: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Split-V forward, step 2: program ``row`` merges its ``splits`` partials
        (SoftmaxStats::merge of csrc/softmax_stats.h) into the outputs of the forward."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_S)
        mask = j < splits
        at = row * splits + j
        m_j = tl.load(part_max_ptr + at, mask=mask, other=float("-inf"))
        m = tl.max(m_j, axis=0)
        s, acc = rescale_stats(
            m_j, tl.where(m == float("-inf"), 0.0, m),
            tl.load(part_sum_ptr + at, mask=mask, other=0.0), tl.load(part_acc_ptr + at, mask=mask, other=0.0),
            q, SHANNON,
        )
        store_entropy_outputs(row, s, acc, m, entropy_ptr, row_max_ptr, log_sum_ptr, power_sum_ptr, q, SHANNON)

    @triton.jit
    def store_block(ptr, cols, V, value, MASKED: tl.constexpr):
        """Store a block of a row in ``ptr``'s dtype; columns >= V are skipped when MASKED."""
        if MASKED:
            tl.store(ptr + cols, value.to(ptr.dtype.element_ty), mask=cols < V)
        else:
            tl.store(ptr + cols, value.to(ptr.dtype.element_ty))

    @triton.jit
    def softmax_block(row_ptr, cols, V, m, log_s, MASKED: tl.constexpr):
        """(log p, log2 p, p) of a block of a row's columns."""
        # (z - m) - log s, not z - (m + log s): z - m is exact, m + log s is not
        log_p = (load_logits(row_ptr, cols, V, MASKED) - m) - log_s
        log2_p = log_p * LOG2E
        return log_p, log2_p, exp2_ftz(log2_p)

    @triton.jit
    def entropy_grad_terms(log_p, log2_p, p, grad, entropy, power_sum, q, SHANNON: tl.constexpr):
        """grad · dS/dz of a block from its softmax_block."""
        if SHANNON:
            # p == 0 (masked logit) contributes 0; 0 * log 0 would be nan.
            return -grad * p * tl.where(p > 0, log_p + entropy, 0.0)
        else:
            return (-grad * q / (q - 1.0)) * (exp2_ftz(q * log2_p) - p * power_sum)

    @triton.jit
    def entropy_grad_block(
        row_ptr, grad_row_ptr, cols, V, grad, entropy, m, log_s, power_sum, q, SHANNON: tl.constexpr, MASKED: tl.constexpr
    ):
        """grad · dS/dz of a block of a row's columns into its gradient row."""
        log_p, log2_p, p = softmax_block(row_ptr, cols, V, m, log_s, MASKED)
        store_block(grad_row_ptr, cols, V, entropy_grad_terms(log_p, log2_p, p, grad, entropy, power_sum, q, SHANNON),
                    MASKED)

    @triton.jit
    def _entropy_backward_kernel(
        grad_entropy_ptr, logits_ptr, logits_row_stride, entropy_ptr, row_max_ptr, log_sum_ptr, power_sum_ptr,
        grad_logits_ptr, grad_row_stride, V, q,
        SHANNON: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        grad_row_ptr = grad_logits_ptr + row * grad_row_stride
        grad = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        m = tl.load(row_max_ptr + row)
        log_s = tl.load(log_sum_ptr + row)
        power_sum = tl.load(power_sum_ptr + row)
        offsets = tl.arange(0, BLOCK_V)
        full = V - V % BLOCK_V  # whole blocks unmasked, then the masked tail
        for start in range(0, full, BLOCK_V):
            entropy_grad_block(
                row_ptr, grad_row_ptr, start + offsets, V, grad, entropy, m, log_s, power_sum, q, SHANNON, MASKED=False
            )
        if full < V:
            entropy_grad_block(
                row_ptr, grad_row_ptr, full + offsets, V, grad, entropy, m, log_s, power_sum, q, SHANNON, MASKED=True
            )


def row_kernel_config(V: int) -> dict:
    """Launch config of the row kernels: BLOCK_V columns per step of the loop over V
    (16 per thread at 8 warps), and FP fusion pinned on (FFMA for the online rescale,
    the same code whatever TRITON_DEFAULT_FP_FUSION says)."""
    block_v = min(triton.next_power_of_2(V), 4096)
    return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4, "enable_fp_fusion": True}


def split_v_splits(T: int, V: int) -> int:
    """Programs per row of the triton entropy forward: 1 from SPLIT_V_MAX_ROWS rows on;
    below, enough whole BLOCK_V blocks per program to give ~SPLIT_V_PROGRAMS programs."""
    blocks = triton.cdiv(V, row_kernel_config(V)["BLOCK_V"])
    if T >= SPLIT_V_MAX_ROWS or blocks == 1:
        return 1
    return triton.cdiv(blocks, triton.cdiv(blocks, min(blocks, triton.cdiv(SPLIT_V_PROGRAMS, T))))


def _entropy_forward_triton(logits: torch.Tensor, q: float):
    T, V = logits.shape
    entropy, row_max, log_sum, power_sum = (torch.empty(T, dtype=torch.float32, device=logits.device) for _ in range(4))
    outputs = (entropy, row_max, log_sum, power_sum)
    config, splits = row_kernel_config(V), split_v_splits(T, V)
    if T and splits == 1:
        with device_guard(logits.device):
            _entropy_forward_kernel[(T,)](logits, logits.stride(0), *outputs, V, q, SHANNON=is_shannon(q), **config)
    elif T:
        split_cols = triton.cdiv(triton.cdiv(V, config["BLOCK_V"]), splits) * config["BLOCK_V"]
        partials = torch.empty((3, T, splits), dtype=torch.float32, device=logits.device)  # m, s, acc
        with device_guard(logits.device):
            _entropy_split_kernel[(T, splits)](
                logits, logits.stride(0), *partials, V, split_cols, q, SHANNON=is_shannon(q), **config
            )
            _entropy_merge_kernel[(T,)](
                *partials, *outputs, splits, q,
                SHANNON=is_shannon(q), BLOCK_S=triton.next_power_of_2(splits), num_warps=1, enable_fp_fusion=True,
            )
    return outputs


def _entropy_backward_triton(grad_entropy, logits, entropy, row_max, log_sum, power_sum, q):
    T, V = logits.shape
    grad_logits = torch.empty((T, V), dtype=logits.dtype, device=logits.device)
    if T:
        with device_guard(logits.device):
            _entropy_backward_kernel[(T,)](
                grad_entropy, logits, logits.stride(0), entropy, row_max, log_sum, power_sum,
                grad_logits, grad_logits.stride(0), V, q,
                SHANNON=is_shannon(q), **row_kernel_config(V),
            )
    return grad_logits


# --------------------------------------------------------------------------- cpp


def _entropy_forward_cpp(logits: torch.Tensor, q: float):
    return torch.ops.alter_kernels.entropy_forward(logits, q)


def _entropy_backward_cpp(grad_entropy, logits, entropy, row_max, log_sum, power_sum, q):
    return torch.ops.alter_kernels.entropy_backward(grad_entropy, logits, entropy, row_max, log_sum, power_sum, q)


# --------------------------------------------------------------------------- autograd


# Each backend's forward/backward split (see the module docstring).
ENTROPY_KERNELS = {
    "eager": KernelPair(_entropy_forward_eager, _entropy_backward_eager),
    "triton": KernelPair(_entropy_forward_triton, _entropy_backward_triton),
    "cpp": KernelPair(_entropy_forward_cpp, _entropy_backward_cpp),
}


class TsallisEntropyFunction(torch.autograd.Function):
    """Entropy of [T, V] logits (stride(-1) == 1) through a backend's kernels."""

    @staticmethod
    def forward(ctx, logits, q, kernels: KernelPair, check_finite: bool):
        entropy, *row_stats = kernels.forward(logits, q)  # row_max, log_sum, power_sum
        if check_finite:
            check_row_max_finite("tsallis_entropy", row_stats[0])
        ctx.save_for_backward(logits, entropy, *row_stats)
        ctx.q, ctx.kernels = q, kernels
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):
        logits, entropy, *row_stats = ctx.saved_tensors
        # The incoming gradient may be an expanded view (stride 0), e.g. from .sum().
        grad_entropy = grad_entropy.to(entropy.dtype).contiguous()
        return ctx.kernels.backward(grad_entropy, logits, entropy, *row_stats, ctx.q), None, None, None


class FusedLinearEntropyFunction(torch.autograd.Function):
    """Entropy of softmax(hidden @ weight.T), computed chunk_size tokens at a time.

    The backward recomputes each chunk's logits, gets their gradient from the entropy
    backward, and folds it into the hidden and weight gradients before the next chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, q, chunk_size, kernels: KernelPair):
        # max(T, 1): with no tokens, one empty chunk still gives the outputs their dtype.
        per_chunk = [
            kernels.forward(hidden[start : start + chunk_size] @ weight.T, q)
            for start in range(0, max(hidden.shape[0], 1), chunk_size)
        ]
        entropy, *row_stats = (torch.cat(stats) for stats in zip(*per_chunk))
        ctx.save_for_backward(hidden, weight, entropy, *row_stats)
        ctx.q, ctx.chunk_size, ctx.kernels = q, chunk_size, kernels
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):
        hidden, weight, entropy, *row_stats = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_entropy = grad_entropy.to(entropy.dtype).contiguous()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Summed over the chunks in float32 (float64 for float64 weights), rounded to the
        # weight's dtype once: a bf16 sum of 16-32 chunks is ~1% off.
        grad_weight = torch.zeros_like(weight, dtype=result_dtype(weight.dtype)) if need_weight else None
        step = ctx.chunk_size
        for start in range(0, hidden.shape[0], step):
            chunk = slice(start, start + step)
            hidden_chunk = hidden[chunk]
            grad_logits = ctx.kernels.backward(
                grad_entropy[chunk], hidden_chunk @ weight.T, entropy[chunk], *(stat[chunk] for stat in row_stats), ctx.q
            )
            if need_hidden:
                grad_hidden[chunk] = grad_logits @ weight
            if need_weight:
                add_matmul(grad_weight, grad_logits.T, hidden_chunk)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the product and the sum in ``acc``'s dtype (float32 for half
    precision ``a``, ``b``): on CUDA a half-precision GEMM with a float32 output, in
    slabs of WEIGHT_GRAD_SLAB rows to bound its temporary; elsewhere the operands upcast."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        for start in range(0, acc.shape[0], WEIGHT_GRAD_SLAB):
            rows = slice(start, start + WEIGHT_GRAD_SLAB)
            acc[rows] += torch.mm(a[rows], b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# --------------------------------------------------------------------------- public ops


def tsallis_entropy(
    logits: torch.Tensor, q: float, backend: str | None = None, check_finite: bool = True
) -> torch.Tensor:
    """Tsallis entropy ``S_q = (1 - Σ p^q)/(q - 1)`` of ``p = softmax(logits)`` per row;
    Shannon ``H = -Σ p log p`` when ``|q - 1| < 1e-3``.

    logits: [..., V], V >= 1, float16/bfloat16/float32/float64, any strides; -inf entries
      are masked out of the distribution (a row of all -inf is an error).
    q: > 0.
    check_finite: raise ValueError for a row of all -inf (one host sync on a GPU). With
      False (a decode step captured in a CUDA graph) no device value is read on the host,
      and such a row gets a NaN entropy (and NaN gradient) on every backend.
    Returns [...] float32 (float64 for float64 logits). Differentiable in ``logits``
    (gradient in the logits' dtype); on the eager backend twice differentiable.
    """
    op = "tsallis_entropy"
    check_logits(op, logits)
    q = check_q(op, q)
    backend = resolve_backend(op, backend, logits.device, ("eager", "triton", "cpp"))
    if backend == "eager":
        if check_finite:
            check_rows_finite_somewhere(op, logits)
        return tsallis_entropy_eager(logits, q)
    rows = rows_with_unit_stride(logits)
    entropy = TsallisEntropyFunction.apply(rows, q, ENTROPY_KERNELS[backend], check_finite)
    return entropy.to(result_dtype(logits.dtype)).reshape(logits.shape[:-1])


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk of :func:`fused_linear_entropy`: at most DEFAULT_CHUNK_ELEMENTS
    logits (256 MiB in bf16), rounded down to a multiple of CHUNK_ROWS tokens (1024 at
    V = 128256); fewer than CHUNK_ROWS (at least one) only past 2^19 words."""
    rows = DEFAULT_CHUNK_ELEMENTS // vocab_size
    return rows - rows % CHUNK_ROWS if rows >= CHUNK_ROWS else max(1, rows)


def fused_linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    q: float,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Entropy of ``softmax(hidden @ weight.T)`` per token, never holding more than
    ``chunk_size × V`` logits at once (forward and backward).

    hidden: [T, D] float; weight: [V, D] (the lm head), same dtype and device.
    q: > 0 (Shannon when |q - 1| < 1e-3).
    chunk_size: tokens per chunk; default :func:`default_chunk_size` (256 MiB of bf16 logits).
    Returns [T] float32 (float64 for float64 inputs), differentiable in hidden and weight.
    The matmuls are torch; each chunk's entropy runs on the chosen backend.
    """
    op = "fused_linear_entropy"
    check_tensor(op, "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{op}: weight must be [V, D] with D = hidden.shape[1] = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have a non-empty vocabulary (first) dimension, got shape {tuple(weight.shape)}")
    check_same_device(op, hidden=hidden, weight=weight)
    q = check_q(op, q)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{op}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
    elif chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    backend = resolve_backend(op, backend, hidden.device, ("eager", "triton", "cpp"))
    entropy = FusedLinearEntropyFunction.apply(hidden, weight, q, chunk_size, ENTROPY_KERNELS[backend])
    return entropy.to(result_dtype(hidden.dtype))
