"""Routed AsymLoRA for inference: one adapted layer's whole adapter, router to expand,
added into the base layer's output by one op.

With x [T, in], the router W_g [N, in] and u [N], the shared A [r, in], the experts
B [N, d, r], the scaling s and the tokens' entropy S [T]::

    l_t    = W_g x_t + S_t u                  (router logits, at least float32)
    G_t    = the gate of route(l_t) [N]      (top-k_t experts, softmax at tau_t, 0 elsewhere)
    out_t += Σ_e G_te · s B_e A x_t

The weights come in the layout ``AsymLoRALinear`` keeps for calls without autograd:
``stacked`` = [W_g; A] [N + r, in] (the router and the shrink in one GEMM) and ``expand`` =
s·B_cat^T [N·r, d] (B_cat: the experts side by side). ``experts`` [T] replaces the gate
by its one-hot (forced or sequence routes); the router is then not read.

Formulations:

- ``gated_asym_lora_eager``: the readable composition (one GEMM, :func:`dense_gate`, the
  gated rank ``G ⊗ h`` [T, N·r], one ``addmm_``): ``AsymLoRALinear``'s dense path, which
  training differentiates, is the same composition.
- cpp (CPU): ``torch.ops.alter_kernels.gated_asym_lora_``, the shrink GEMM, the gate in
  a C++ loop and the expand (over the kept experts' rows only at <= 16 tokens), in one
  call: at decode sizes (a few tokens, N·r <= 128) a layer's cost is the Python dispatch
  of a dozen small ops, not their FLOPs.
- triton (GPU): one kernel, one launch per layer instead of a dozen: each program takes
  BLOCK_T tokens and BLOCK_D output features, computes the router logits and h of its
  tokens (the shrink is repeated by the d-tiles: at decode it is a [T, in] x [in, N + r]
  product), their gate in registers (ranks by pairwise comparison), and adds
  (G ⊗ h) @ expand into its out tile. For N, r <= 16 (the decode shapes) and 16/32-bit
  x; other inputs take the eager composition.

Inference only: no backward (the op refuses inputs that require grad under autograd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alter_kernels._dispatch import device_guard, resolve_backend
from alter_kernels._triton import tl, triton
from alter_kernels._validation import FLOAT_DTYPES, check_same_device, check_tensor
from alter_kernels.asym_lora import _gpu_arch, dot_dtypes, gated_rank
from alter_kernels.routing import (MAX_EXPERTS_PER_TOKEN, _check_int, _check_real, dense_gate, route_constants,
                                   router_logits_with_entropy)

_OP = "gated_asym_lora"


def gated_asym_lora_eager(out, x, stacked, entropy_weight, entropy, expand, num_experts, threshold, tau_high, tau_low,
                          k_high, k_low, experts=None):
    """Readable reference of :func:`gated_asym_lora` (no checks): adds the delta into
    ``out`` [T, d] and returns it."""
    shrunk = F.linear(x, stacked)  # [T, N + r]: W_g x, then A x
    if experts is None:
        logits = router_logits_with_entropy(shrunk[:, :num_experts], entropy, entropy_weight)
        k, tau = route_constants(entropy, threshold, tau_high, tau_low, k_high, k_low, logits.dtype)
        gate = dense_gate(logits, k, tau)
    else:
        gate = F.one_hot(experts.long(), num_experts)
    return out.addmm_(gated_rank(gate.to(x.dtype), shrunk[:, num_experts:]), expand)


# --------------------------------------------------------------------------- triton

MAX_TRITON_EXPERTS = MAX_TRITON_RANK = 16  # the gated rank lives in registers: [BLOCK_T, 16·16] at most

if triton is not None:

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        """``v`` (fp32/fp64) rounded to ``dtype`` and back, to nearest even: the interpreter
        truncates fp32 -> bf16 casts, and a logit one bf16 step off moves a gate at tau 0.01."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(dtype).to(v.dtype)

    @triton.jit
    def _gated_asym_lora_kernel(
        out_ptr, x_ptr, stacked_ptr, u_ptr, entropy_ptr, expand_ptr, experts_ptr,
        T, d_in, d, stride_ot, stride_xt, stride_xk, stride_sr, stride_ex,
        threshold, tau_high, tau_low, k_high, k_low,
        N: tl.constexpr, R: tl.constexpr, HAS_EXPERTS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):
        """out[t-tile, d-tile] += (G ⊗ h)[t-tile] @ expand[:, d-tile]; stacked and expand
        have unit stride along their columns. Grid (cdiv(T, BLOCK_T), cdiv(d, BLOCK_D))."""
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows < T
        experts = tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        # The shrink: router logits [BLOCK_T, BLOCK_N] and h [BLOCK_T, BLOCK_R], fp32 (fp64) sums.
        logits = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC_DTYPE)
        h = tl.zeros([BLOCK_T, BLOCK_R], dtype=ACC_DTYPE)
        for start in range(0, d_in, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = ks < d_in
            x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
            w_g = tl.load(stacked_ptr + experts[None, :] * stride_sr + ks[:, None],
                          mask=(experts[None, :] < N) & k_ok[:, None], other=0.0).to(DOT_DTYPE)
            a = tl.load(stacked_ptr + (N + ranks[None, :]) * stride_sr + ks[:, None],
                        mask=(ranks[None, :] < R) & k_ok[:, None], other=0.0).to(DOT_DTYPE)
            logits = tl.dot(x, w_g, logits, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            h = tl.dot(x, a, h, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        # rounded to x's dtype, as the GEMM of the eager path returns them
        logits = _rounded(logits, out_ptr.dtype.element_ty)
        h = _rounded(h, out_ptr.dtype.element_ty)

        if HAS_EXPERTS:
            picked = tl.load(experts_ptr + rows, mask=row_ok, other=-1)
            gate = tl.where(experts[None, :] == picked[:, None], 1.0, 0.0).to(ACC_DTYPE)
        else:
            ent = tl.load(entropy_ptr + rows, mask=row_ok, other=1.0)  # padded rows: no 0·(-inf)
            high = ent > threshold  # in the entropy's dtype, as torch compares it
            u = tl.load(u_ptr + experts, mask=experts < N, other=0.0).to(ACC_DTYPE)
            logits = logits + ent.to(ACC_DTYPE)[:, None] * u[None, :]
            logits = tl.where(logits != logits, float("inf"), logits)  # NaN ranks first and spoils the row
            logits = tl.where(experts[None, :] < N, logits, float("-inf"))
            # rank of expert e: experts with a larger logit, or an equal one and a lower index
            ahead = (logits[:, None, :] > logits[:, :, None]) | (
                (logits[:, None, :] == logits[:, :, None]) & (experts[None, None, :] < experts[None, :, None]))
            rank = tl.sum(ahead.to(tl.int32), axis=2)
            keep = rank < tl.where(high, k_high, k_low)[:, None]
            top = tl.max(logits, axis=1)
            tau = tl.where(high, tau_high, tau_low).to(ACC_DTYPE)
            weight = tl.where(keep, tl.exp((logits - top[:, None]) / tau[:, None]), 0.0)
            gate = weight / tl.sum(weight, axis=1)[:, None]
            # a NaN or +inf logit, or only -inf ones: the whole row NaN, as the eager path
            bad = (top == float("inf")) | (top == float("-inf"))
            gate = tl.where(bad[:, None], float("nan"), gate)
        gate = _rounded(gate, out_ptr.dtype.element_ty)  # the eager path's gate.to(x.dtype)

        gated = tl.reshape(gate[:, :, None] * h[:, None, :], (BLOCK_T, BLOCK_N * BLOCK_R))
        gated = _rounded(gated, out_ptr.dtype.element_ty).to(DOT_DTYPE)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        slot = tl.arange(0, BLOCK_N * BLOCK_R)
        slot_expert, slot_rank = slot // BLOCK_R, slot % BLOCK_R
        expand = tl.load(expand_ptr + (slot_expert * R + slot_rank)[:, None].to(tl.int64) * stride_ex + cols[None, :],
                         mask=((slot_expert < N) & (slot_rank < R))[:, None] & col_ok[None, :],
                         other=0.0).to(DOT_DTYPE)
        out_ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :]
        out_mask = row_ok[:, None] & col_ok[None, :]
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0).to(ACC_DTYPE)
        acc = tl.dot(gated, expand, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _launch_triton(out, x, stacked, entropy_weight, entropy, expand, num_experts, threshold, tau_high, tau_low,
                   k_high, k_low, experts):
    """The triton kernel on inputs whose stacked, expand and out have unit column stride."""
    T, d_in = x.shape
    d = expand.shape[1]
    rank = stacked.shape[0] - num_experts
    interpret = _gpu_arch(x.device) is None  # small tiles: the tests cover several of each
    block_t, block_d, block_k = (16, 32, 16) if interpret else (16, 64, 64)
    grid = (triton.cdiv(T, block_t), triton.cdiv(d, block_d))
    entropy = entropy.contiguous()
    with device_guard(x.device):
        _gated_asym_lora_kernel[grid](
            out, x, stacked, entropy_weight.contiguous(), entropy, expand,
            entropy if experts is None else experts.contiguous(),
            T, d_in, d, out.stride(0), x.stride(0), x.stride(1), stacked.stride(0), expand.stride(0),
            threshold, tau_high, tau_low, k_high, k_low,
            N=num_experts, R=rank, HAS_EXPERTS=experts is not None, BLOCK_T=block_t, BLOCK_D=block_d,
            BLOCK_K=block_k, BLOCK_N=max(16, triton.next_power_of_2(num_experts)),
            BLOCK_R=max(16, triton.next_power_of_2(rank)), **dot_dtypes(x.device, x.dtype), num_warps=4,
        )
    return out


def _triton_fits(out, stacked, entropy, expand, num_experts) -> bool:
    """Shapes and dtypes the kernel takes: N, r <= 16, unit column strides, and 16/32-bit
    x with float32 entropy (the kernel's scalars threshold and tau are float32, as torch
    uses them on float32 logits and entropy; float64 would round them)."""
    rank = stacked.shape[0] - num_experts
    unit_columns = all(t.shape[1] == 1 or t.stride(1) == 1 for t in (out, stacked, expand))
    return (num_experts <= MAX_TRITON_EXPERTS and rank <= MAX_TRITON_RANK and unit_columns
            and out.dtype != torch.float64 and entropy.dtype == torch.float32)


# --------------------------------------------------------------------------- public op


def _check_inputs(out, x, stacked, entropy_weight, entropy, expand, num_experts, k_high, k_low, experts):
    check_tensor(_OP, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    for name, t in (("out", out), ("stacked", stacked), ("expand", expand)):
        check_tensor(_OP, name, t, ndim=2, dtypes=(x.dtype,))
    check_tensor(_OP, "entropy_weight", entropy_weight, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "entropy", entropy, ndim=1, dtypes=(torch.float32, torch.float64))
    if experts is not None:
        check_tensor(_OP, "experts", experts, ndim=1, dtypes=(torch.int32,))
    check_same_device(_OP, out=out, x=x, stacked=stacked, entropy_weight=entropy_weight, entropy=entropy,
                      expand=expand, experts=experts)
    N = _check_int(_OP, "num_experts", num_experts, low=1)
    T, d_in = x.shape
    r = stacked.shape[0] - N
    if r < 1 or stacked.shape[1] != d_in:
        raise ValueError(f"{_OP}: stacked must be [N + r, in] = [{N} + r >= {N + 1}, {d_in}] ([W_g; A] for x "
                         f"{tuple(x.shape)}), got {tuple(stacked.shape)}")
    if entropy_weight.shape[0] != N:
        raise ValueError(f"{_OP}: entropy_weight must be [N={N}], got {tuple(entropy_weight.shape)}")
    if expand.shape[0] != N * r:
        raise ValueError(f"{_OP}: expand must be [N·r = {N * r}, d] (s·B_cat^T), got {tuple(expand.shape)}")
    if entropy.shape[0] != T or out.shape != (T, expand.shape[1]):
        raise ValueError(f"{_OP}: entropy must be [T={T}] and out [T, d] = [{T}, {expand.shape[1]}], got "
                         f"{tuple(entropy.shape)} and {tuple(out.shape)}")
    if out.stride(1) != 1 or (T > 1 and out.stride(0) < out.shape[1]):
        raise ValueError(f"{_OP}: out must have rows of unit stride that do not overlap, got strides {out.stride()}")
    k_high = _check_int(_OP, "k_high", k_high, low=1, high=min(N, MAX_EXPERTS_PER_TOKEN))
    _check_int(_OP, "k_low", k_low, low=1, high=k_high)
    if experts is not None:
        if experts.shape[0] != T:
            raise ValueError(f"{_OP}: experts must be [T={T}], got {tuple(experts.shape)}")
        if T and not bool(((experts >= 0) & (experts < N)).all()):
            raise ValueError(f"{_OP}: experts holds ids outside [0, {N}) for N={N} experts")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, x, stacked, entropy_weight, expand)):
        raise RuntimeError(f"{_OP}: inference only (no backward); run it under torch.no_grad() or inference_mode()")


def gated_asym_lora(out, x, stacked, entropy_weight, entropy, expand, num_experts, *, threshold, tau_high, tau_low,
                    k_high, k_low, experts=None, backend=None, check_inputs=True):
    """out += the routed AsymLoRA delta of x (see the module doc); returns ``out``.

    out [T, d] and x [T, in] of one float dtype (fp16/bf16/fp32/fp64); stacked [N + r, in]
    and expand [N·r, d] of x's dtype; entropy_weight [N] any float dtype; entropy [T]
    float32 or float64; experts [T] int32 in [0, N) or None (route by the router). threshold,
    tau_high, tau_low, k_high, k_low: as :func:`alter_kernels.route`. backend: "eager" |
    "cpp" (CPU) | "triton" (N, r <= 16, not float64) | None. check_inputs: False skips the checks (and the host sync that checks
    ``experts``) for callers whose inputs are right by construction (``AsymLoRALinear``).
    """
    if check_inputs:
        _check_inputs(out, x, stacked, entropy_weight, entropy, expand, num_experts, k_high, k_low, experts)
        threshold = _check_real(_OP, "threshold", threshold)
        tau_high = _check_real(_OP, "tau_high", tau_high, positive=True)
        tau_low = _check_real(_OP, "tau_low", tau_low, positive=True)
    return run_gated_asym_lora(choose_backend(x.device, backend), out, x, stacked, entropy_weight, entropy, expand,
                               num_experts, threshold, tau_high, tau_low, k_high, k_low, experts,
                               strict=backend == "triton")


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend :func:`gated_asym_lora` runs on ``device`` (see ``_dispatch``)."""
    implemented = ("eager", "cpp", "triton") if device.type == "cpu" else ("eager", "triton")  # C++: CPU only
    return resolve_backend(_OP, backend, device, implemented)


def run_gated_asym_lora(chosen, out, x, stacked, entropy_weight, entropy, expand, num_experts, threshold, tau_high,
                        tau_low, k_high, k_low, experts=None, strict=False):
    """:func:`gated_asym_lora` on the backend ``chosen`` by :func:`choose_backend`, inputs
    unchecked: for a caller that chose once for many calls (a model's layers in one call).
    Inputs the triton kernel does not take go to eager, or raise with ``strict``."""
    args = (out, x, stacked, entropy_weight, entropy, expand, num_experts, threshold, tau_high, tau_low, k_high, k_low,
            experts)
    if chosen == "cpp":
        torch.ops.alter_kernels.gated_asym_lora_(*args)
        return out
    if chosen == "triton":
        if _triton_fits(out, stacked, entropy, expand, num_experts):
            return _launch_triton(*args)
        if strict:
            raise ValueError(f"{_OP}: the triton backend takes N <= {MAX_TRITON_EXPERTS} experts and r <= "
                             f"{MAX_TRITON_RANK}, float16/bfloat16/float32 x with float32 entropy, and out, stacked "
                             "and expand of unit column stride; use backend='eager'")
    with torch.autocast(x.device.type, enabled=False):  # x's dtype throughout, as the kernels compute
        return gated_asym_lora_eager(*args)
