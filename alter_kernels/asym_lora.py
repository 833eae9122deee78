"""Entropy-gated grouped AsymLoRA matmul: one shared A (shrink), N experts B (expand).

With ``x [T, k]``, ``A [r, k]``, ``B [N, d, r]``, gate ``weights [T, K]``, ``experts [T, K]``
(expert −1 = unused slot) and scaling ``s``::

    h_t     = x_t A^T                                  (shrink, once for all experts)
    delta_t = s · Σ_k w_tk · B_{e_tk} h_t              (gated grouped expand)

and backward, with ``g_t = dL/d delta_t`` and the optional token mask ``m_t``::

    dh_t  = s Σ_k w_tk B_{e_tk}^T g_t
    dB_e  = s Σ_{(t,k): e_tk = e} w_tk g_t h_t^T
    dw_tk = s · g_t · (B_{e_tk} h_t)                   (0 for unused slots)
    dA    = Σ_t m_t dh_t^T x_t                          (A learns only where m_t)
    dx_t  = A^T dh_t

Formulations:

- ``asym_lora_eager``: the readable reference (a loop over experts, ``index_add`` of each
  expert's tokens); plain autograd gives the backward.
- ``asym_lora_eager_dense``: the fastest plain-PyTorch formulation, for benchmarks: the
  gate is scattered into a dense ``[T, N]`` matrix ``G`` and the expand becomes one GEMM
  ``(G ⊗ h) [T, N·r] @ B_cat^T [N·r, d]``; its backward is dense GEMMs too.
- Triton, forward: h = x A^T by cuBLAS, then a token-major expand kernel: each program
  owns a [BLOCK_M tokens, BLOCK_N features] output tile, forms each routed expert's gate
  column G_e from the tile's slots and accumulates G_e ⊙ (h B_e^T) with tl.dot, skipping
  experts no token of the tile uses; every output element is written once (no atomics,
  no fp32 buffer, deterministic); under forced routes a tile mostly sees one expert.
- Triton, backward: the (token, slot) pairs are grouped by expert with
  :func:`alter_kernels.routing.moe_align`; a grouped kernel gives dh and dw (a program
  owns whole slots and reduces over a chunk of d), a per-expert kernel gives dB (a
  program owns one [BLOCK_N, r] tile of dB_e and walks a share of that expert's blocks),
  and cuBLAS gives dx = dh A and dA = (m ⊙ dh)^T x. Both reductions are split into
  enough parts to fill the GPU and the parts are summed afterwards: no atomics, and
  the results are deterministic.
"""
from __future__ import annotations

import math
import numbers
from functools import lru_cache

import torch

from alter_kernels._dispatch import device_guard, resolve_backend, triton_interpret
from alter_kernels._triton import tl, triton
from alter_kernels._validation import FLOAT_DTYPES, check_same_device, check_tensor
from alter_kernels.routing import moe_align_unchecked

_OP = "asym_lora"
_IMPLEMENTED = ("eager", "triton")


# --------------------------------------------------------------------------- eager


def _shrink(x: torch.Tensor, A: torch.Tensor, a_grad_mask: torch.Tensor | None) -> torch.Tensor:
    """h = x A^T [T, r], with A's gradient taken only from tokens where ``a_grad_mask``.

    Masked-out tokens use a detached copy of A, so they still pass gradient to x but
    not to A.
    """
    h = x @ A.t()
    if a_grad_mask is None:
        return h
    return torch.where(a_grad_mask[:, None], h, x @ A.detach().t())


def asym_lora_eager(x, A, B, weights, experts, scaling, a_grad_mask=None):
    """Readable reference of :func:`asym_lora` (no input checks; autograd does backward).

    x [T, k], A [r, k], B [N, d, r] (one float dtype), weights [T, K] float32 (or
    float64), experts [T, K] int32 (−1 = unused slot), a_grad_mask [T] bool or None.
    Returns delta [T, d] in x's dtype. Loops over experts: expert e multiplies the rows
    of h routed to it by B_e and adds them, weighted, into their tokens' outputs.
    """
    h = _shrink(x, A, a_grad_mask)
    delta = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(B.shape[0]):
        tokens, slots = (experts == e).nonzero(as_tuple=True)
        expert_out = h[tokens] @ B[e].t()  # [n_e, d]
        gate = weights[tokens, slots].to(x.dtype)[:, None]
        delta = delta.index_add(0, tokens, gate * expert_out)
    return scaling * delta


def asym_lora_eager_dense(x, A, B, weights, experts, scaling, a_grad_mask=None):
    """Fast plain-PyTorch :func:`asym_lora` (same contract as :func:`asym_lora_eager`).

    Scatters the gate into a dense G [T, N] (G[t, e] = Σ_k w_tk [e_tk = e]), so the
    expand is one GEMM of rank N·r: delta = s · (G ⊗ h) [T, N·r] @ B_cat^T with
    B_cat [d, N·r] = B laid side by side. No host syncs; memory O(T·N·r).
    """
    T, K = experts.shape
    N, d, r = B.shape
    h = _shrink(x, A, a_grad_mask)
    used = experts >= 0
    gate = torch.zeros(T, N, dtype=x.dtype, device=x.device).scatter_add(
        1, experts.clamp(min=0).long(), torch.where(used, weights, 0.0).to(x.dtype)
    )
    gated_h = (gate[:, :, None] * h[:, None, :]).reshape(T, N * r)
    B_cat = B.permute(1, 0, 2).reshape(d, N * r)
    return scaling * (gated_h @ B_cat.t())


# --------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _slot_block(sorted_ids_ptr, block, num_slots, K, BLOCK_M: tl.constexpr):
        """Flat slot ids t·K + j of one moe_align block, their validity and tokens."""
        slots = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = slots < num_slots  # padding holds num_slots = T·K
        tokens = (slots // K).to(tl.int64)
        return slots, valid, tokens

    @triton.jit
    def _gated_expand_kernel(
        h_ptr, B_ptr, weights_ptr, experts_ptr, scaling_ptr, out_ptr,
        T, K, N, d, r,
        stride_ht, stride_hr, stride_be, stride_bd, stride_br, stride_ot, stride_od,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):
        """out[m-tile, n-tile] = s · Σ_e G_e ⊙ (h[m-tile] B_e[n-tile]^T), G_e[t] = Σ_k w_tk [e_tk = e].

        Grid (cdiv(T, BLOCK_M), cdiv(d, BLOCK_N)). Token-major: each output tile is
        written once (no atomics, no zero fill, deterministic); only experts that some
        token of the tile routes to are multiplied.
        """
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < T
        n_mask = offs_n < d
        r_mask = offs_r < r
        route_offs = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        route_mask = m_mask[:, None] & (offs_k[None, :] < K)
        slot_experts = tl.load(experts_ptr + route_offs, mask=route_mask, other=-1)
        slot_weights = tl.load(weights_ptr + route_offs, mask=route_mask, other=0.0).to(ACC_DTYPE)
        h = tl.load(
            h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_r[None, :] * stride_hr,
            mask=m_mask[:, None] & r_mask[None, :], other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        first_expert = tl.min(tl.where(slot_experts >= 0, slot_experts, N))
        last_expert = tl.max(slot_experts)
        for expert in range(first_expert, last_expert + 1):
            routed = slot_experts == expert
            if tl.max(routed.to(tl.int32)) > 0:
                gate = tl.sum(tl.where(routed, slot_weights, 0.0), axis=1)
                b_t = tl.load(  # B_e^T tile [BLOCK_R, BLOCK_N]; rows past r are zero padding
                    B_ptr + expert * stride_be + offs_n[None, :] * stride_bd
                    + offs_r[:, None] * stride_br,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0,
                ).to(DOT_DTYPE)
                acc += tl.dot(h, b_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * gate[:, None]
        acc *= tl.load(scaling_ptr)
        tl.store(
            out_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_n[None, :] * stride_od,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )

    @triton.jit
    def _grouped_shrink_grad_kernel(
        grad_ptr, h_ptr, B_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
        grad_h_parts_ptr, grad_weights_parts_ptr,
        num_slots, K, d, r, d_chunk, scaling_ptr,
        stride_gt, stride_gd, stride_ht, stride_hr, stride_be, stride_bd, stride_br,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):
        """Per slot (t, k) of one block of expert e and one chunk c of d (part c):
        p = B_e[c]^T g_t[c], grad_h_parts[c, t·K + k] = s·w_tk·p and
        grad_weights_parts[c, t·K + k] = s·(h_t · p). Summing the parts over c gives dh
        per slot and dw.

        Grid (blocks, parts). A program owns whole slots of its part: no atomics, and the
        parts are summed in a fixed order (deterministic).
        """
        block = tl.program_id(0)
        if block * BLOCK_M >= tl.load(num_padded_ptr):
            return
        part = tl.program_id(1)
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        slots, valid, tokens = _slot_block(sorted_ids_ptr, block, num_slots, K, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        projected = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC_DTYPE)
        n_begin = part * d_chunk
        for n_start in range(n_begin, tl.minimum(n_begin + d_chunk, d), BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < d
            g = tl.load(
                grad_ptr + tokens[:, None] * stride_gt + offs_n[None, :] * stride_gd,
                mask=valid[:, None] & n_mask[None, :], other=0.0,
            )
            b = tl.load(
                B_ptr + expert * stride_be + offs_n[:, None] * stride_bd + offs_r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0,
            )
            projected = tl.dot(g.to(DOT_DTYPE), b.to(DOT_DTYPE), projected, input_precision=DOT_PRECISION)
        h = tl.load(
            h_ptr + tokens[:, None] * stride_ht + offs_r[None, :] * stride_hr,
            mask=valid[:, None] & r_mask[None, :], other=0.0,
        ).to(ACC_DTYPE)
        scaling = tl.load(scaling_ptr)
        gate = scaling * tl.load(weights_ptr + slots, mask=valid, other=0.0)
        part_slots = part.to(tl.int64) * num_slots + slots
        tl.store(grad_weights_parts_ptr + part_slots, scaling * tl.sum(h * projected, axis=1), mask=valid)
        tl.store(
            grad_h_parts_ptr + part_slots[:, None] * r + offs_r[None, :],
            gate[:, None] * projected,
            mask=valid[:, None] & r_mask[None, :],
        )

    @triton.jit
    def _expert_grad_kernel(
        grad_ptr, h_ptr, weights_ptr, sorted_ids_ptr, expert_first_block_ptr, expert_num_blocks_ptr,
        grad_B_parts_ptr,
        num_slots, K, d, r, num_parts, scaling_ptr,
        stride_gt, stride_gd, stride_ht, stride_hr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):
        """grad_B_parts[c, e, n-tile] = s · Σ over blocks c, c + parts, c + 2·parts, ... of
        expert e of w_tk g_t[n-tile] h_t^T; summing over c gives dB_e.

        Grid (N, cdiv(d, BLOCK_N), parts): a program owns one [BLOCK_N, r] tile of one part
        of dB_e (no atomics; the parts are summed in a fixed order). An expert without
        tokens gets zeros. grad_B_parts is contiguous [parts, N, d, r].
        """
        expert = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        part = tl.program_id(2)
        offs_r = tl.arange(0, BLOCK_R)
        n_mask = offs_n < d
        r_mask = offs_r < r
        first_block = tl.load(expert_first_block_ptr + expert)
        num_blocks = tl.load(expert_num_blocks_ptr + expert)
        scaling = tl.load(scaling_ptr)
        acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=ACC_DTYPE)
        for block in range(first_block + part, first_block + num_blocks, num_parts):
            slots, valid, tokens = _slot_block(sorted_ids_ptr, block, num_slots, K, BLOCK_M)
            g_t = tl.load(  # g^T tile [BLOCK_N, BLOCK_M]
                grad_ptr + tokens[None, :] * stride_gt + offs_n[:, None] * stride_gd,
                mask=valid[None, :] & n_mask[:, None], other=0.0,
            )
            h = tl.load(
                h_ptr + tokens[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                mask=valid[:, None] & r_mask[None, :], other=0.0,
            ).to(ACC_DTYPE)
            gate = scaling * tl.load(weights_ptr + slots, mask=valid, other=0.0)
            gated_h = (h * gate[:, None]).to(DOT_DTYPE)
            acc = tl.dot(g_t.to(DOT_DTYPE), gated_h, acc, input_precision=DOT_PRECISION)
        tile = (part * tl.num_programs(0) + expert).to(tl.int64) * d * r
        tl.store(
            grad_B_parts_ptr + tile + offs_n[:, None] * r + offs_r[None, :],
            acc,
            mask=n_mask[:, None] & r_mask[None, :],
        )


@lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device; None off the GPU (the interpreter). benchmarks/compile_report.py
    replaces it to size the grids for a target GPU."""
    return _cuda_sm_count(device.index) if device.type == "cuda" else None


class _KernelConfig:
    """Tile sizes and dtypes of one call's kernels.

    Tiles: on a GPU half tiles go to tensor cores as they are (fp32 accumulation) and fp32
    tiles use exact fp32 products ("ieee", as torch's default matmul); the interpreter's
    bf16/fp16 dot is unreliable, so there tiles are cast to fp32. float64 stays float64.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, num_slots: int, r: int):
        interpret = triton_interpret()
        self.device = device
        if dtype == torch.float64:
            self.dot_dtype, self.acc_dtype = tl.float64, tl.float64
        elif interpret or dtype == torch.float32:
            self.dot_dtype, self.acc_dtype = tl.float32, tl.float32
        else:
            self.dot_dtype = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
            self.acc_dtype = tl.float32
        # "tf32" is triton's default; it only changes fp32 tiles, which get "ieee" here
        self.dot_precision = "ieee" if self.dot_dtype == tl.float32 else "tf32"
        self.torch_acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.block_r = max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16
        self.block_tokens = 16 if interpret else 64  # token tile of the forward
        self.block_n_expand = 64 if interpret else 128
        # slot blocks of the backward; few slots (decoding): less moe_align padding per expert
        self.block_slots = 16 if interpret or num_slots < 4096 else 64
        self.block_n_reduce = 16 if interpret else 64  # 16: tests with small d still split d
        self.num_warps = 4

    def num_parts(self, programs: int, max_parts: int) -> int:
        """How many parts to split a reduction into so that about 4 programs per SM run
        (2 parts in the interpreter, so that CI exercises the split)."""
        sms = _sm_count(self.device)
        target = 2 * programs if sms is None else 4 * sms
        return max(1, min(max_parts, triton.cdiv(target, max(programs, 1))))

    def meta(self, block_m: int, block_n: int) -> dict:
        return dict(
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=self.block_r, DOT_DTYPE=self.dot_dtype,
            DOT_PRECISION=self.dot_precision, ACC_DTYPE=self.acc_dtype, num_warps=self.num_warps,
        )


def _expert_block_ranges(block_expert: torch.Tensor, num_padded: torch.Tensor, block_m: int, num_experts: int):
    """First block index and block count of each expert in moe_align's layout (each
    expert's blocks are contiguous; blocks past num_padded are unused). No host sync."""
    num_blocks = block_expert.numel()
    block_ids = torch.arange(num_blocks, dtype=torch.int32, device=block_expert.device)
    used = (block_ids < num_padded // block_m) & (block_expert >= 0)
    owner = torch.where(used, block_expert, num_experts).long()  # row num_experts collects the unused
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=block_expert.device)
    counts.scatter_add_(0, owner, torch.ones_like(block_expert))
    first = torch.full((num_experts + 1,), num_blocks, dtype=torch.int32, device=block_expert.device)
    first.scatter_reduce_(0, owner, block_ids, reduce="amin")
    return first[:num_experts].contiguous(), counts[:num_experts].contiguous()


class AsymLoRATriton(torch.autograd.Function):
    """Triton forward/backward of :func:`asym_lora` (inputs already validated).

    Forward: h = x A^T (cuBLAS), then the token-major gated expand kernel. Backward: the
    slots are grouped by expert (moe_align), grouped kernels give dh, dw and dB, and
    cuBLAS gives dx = dh A and dA = (m ⊙ dh)^T x.
    """

    @staticmethod
    def forward(ctx, x, A, B, weights, experts, scaling, a_grad_mask):
        T, K = experts.shape
        N, d, r = B.shape
        config = _KernelConfig(x.device, x.dtype, T * K, r)
        h = x @ A.t()
        weights, experts = weights.contiguous(), experts.contiguous()
        # a device scalar, so that float64 calls keep a float64 scale
        scaling_t = torch.full((1,), scaling, dtype=config.torch_acc_dtype, device=x.device)
        out = torch.empty(T, d, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(T, config.block_tokens), triton.cdiv(d, config.block_n_expand))
        with device_guard(x.device):
            _gated_expand_kernel[grid](
                h, B, weights, experts, scaling_t, out,
                T, K, N, d, r,
                h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), out.stride(0), out.stride(1),
                BLOCK_K=triton.next_power_of_2(K), **config.meta(config.block_tokens, config.block_n_expand),
            )
        ctx.save_for_backward(x, A, B, weights, experts, h, scaling_t, a_grad_mask)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_delta):
        x, A, B, weights, experts, h, scaling_t, a_grad_mask = ctx.saved_tensors
        need_x, need_A, need_B, need_weights = ctx.needs_input_grad[:4]
        config = ctx.config
        T, K = experts.shape
        N, d, r = B.shape
        # experts were validated by the forward: no second check (a device sync per layer)
        sorted_ids, block_expert, num_padded = moe_align_unchecked(experts, N, config.block_slots)
        num_slot_blocks = block_expert.numel()
        grad_x = grad_A = grad_B = grad_weights = None
        if need_x or need_A or need_weights:
            d_tiles = triton.cdiv(d, config.block_n_reduce)
            parts = config.num_parts(num_slot_blocks, d_tiles)
            d_chunk = triton.cdiv(d_tiles, parts) * config.block_n_reduce
            parts = triton.cdiv(d, d_chunk)  # no empty part
            grad_h_parts = torch.zeros(parts, T * K, r, dtype=config.torch_acc_dtype, device=x.device)
            grad_weights_parts = torch.zeros(parts, T, K, dtype=weights.dtype, device=x.device)
            with device_guard(x.device):
                _grouped_shrink_grad_kernel[(num_slot_blocks, parts)](
                    grad_delta, h, B, weights, sorted_ids, block_expert, num_padded, grad_h_parts, grad_weights_parts,
                    T * K, K, d, r, d_chunk, scaling_t,
                    grad_delta.stride(0), grad_delta.stride(1), h.stride(0), h.stride(1),
                    B.stride(0), B.stride(1), B.stride(2),
                    **config.meta(config.block_slots, config.block_n_reduce),
                )
            grad_weights = grad_weights_parts.sum(dim=0)
            grad_h = grad_h_parts.view(parts, T, K, r).sum(dim=(0, 2)).to(x.dtype)
            if need_x:
                grad_x = grad_h @ A
            if need_A:
                if a_grad_mask is not None:
                    grad_h = grad_h * a_grad_mask[:, None]
                grad_A = grad_h.t() @ x
        if need_B:
            d_tiles = triton.cdiv(d, config.block_n_reduce)
            parts = config.num_parts(N * d_tiles, triton.cdiv(num_slot_blocks, N))
            grad_B_parts = torch.empty(parts, N, d, r, dtype=config.torch_acc_dtype, device=B.device)
            first_block, num_blocks = _expert_block_ranges(block_expert, num_padded, config.block_slots, N)
            with device_guard(B.device):
                _expert_grad_kernel[(N, d_tiles, parts)](
                    grad_delta, h, weights, sorted_ids, first_block, num_blocks, grad_B_parts,
                    T * K, K, d, r, parts, scaling_t,
                    grad_delta.stride(0), grad_delta.stride(1), h.stride(0), h.stride(1),
                    **config.meta(config.block_slots, config.block_n_reduce),
                )
            grad_B = grad_B_parts.sum(dim=0).to(B.dtype)
        return grad_x, grad_A, grad_B, grad_weights if need_weights else None, None, None, None


# --------------------------------------------------------------------------- public op


def _check_inputs(x, A, B, weights, experts, scaling, a_grad_mask, check_expert_ids) -> None:
    check_tensor(_OP, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "A", A, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "B", B, ndim=3, dtypes=FLOAT_DTYPES)
    # float64 layers may take float64 gate weights (so that a router can be gradchecked)
    weights_dtypes = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    check_tensor(_OP, "weights", weights, ndim=2, dtypes=weights_dtypes)
    check_tensor(_OP, "experts", experts, ndim=2, dtypes=(torch.int32,))
    if a_grad_mask is not None:
        check_tensor(_OP, "a_grad_mask", a_grad_mask, ndim=1, dtypes=(torch.bool,))
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{_OP}: scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"{_OP}: scaling must be finite, got {scaling}")
    if A.dtype != x.dtype or B.dtype != x.dtype:
        raise TypeError(
            f"{_OP}: x, A and B must share one dtype, got x {x.dtype}, A {A.dtype}, B {B.dtype}"
        )
    check_same_device(_OP, x=x, A=A, B=B, weights=weights, experts=experts, a_grad_mask=a_grad_mask)
    T, k = x.shape
    r = A.shape[0]
    N, _, r_b = B.shape
    if r < 1:
        raise ValueError(f"{_OP}: the rank r = A.shape[0] must be >= 1, got A of shape {tuple(A.shape)}")
    if N < 1:
        raise ValueError(f"{_OP}: B must hold at least one expert, got shape {tuple(B.shape)}")
    if A.shape[1] != k:
        raise ValueError(f"{_OP}: A must be [r, k={k}] to match x {tuple(x.shape)}, got {tuple(A.shape)}")
    if r_b != r:
        raise ValueError(f"{_OP}: B must be [N, d, r={r}] to match A {tuple(A.shape)}, got {tuple(B.shape)}")
    if experts.shape[0] != T or experts.shape[1] < 1:
        raise ValueError(f"{_OP}: experts must be [T={T}, K>=1], got {tuple(experts.shape)}")
    if weights.shape != experts.shape:
        raise ValueError(
            f"{_OP}: weights {tuple(weights.shape)} and experts {tuple(experts.shape)} must have one shape"
        )
    if a_grad_mask is not None and a_grad_mask.shape[0] != T:
        raise ValueError(f"{_OP}: a_grad_mask must be [T={T}], got {tuple(a_grad_mask.shape)}")
    if check_expert_ids and experts.numel():
        lowest, highest = (int(v) for v in torch.aminmax(experts))
        bad = lowest if lowest < -1 else highest if highest >= N else None
        if bad is not None:
            raise ValueError(f"{_OP}: experts holds id {bad}, outside [-1, {N}) for N={N} experts")


def asym_lora(x, A, B, weights, experts, scaling, a_grad_mask=None, backend=None, check_expert_ids=True):
    """Entropy-gated grouped AsymLoRA delta (forward and backward; see the module doc).

    x [T, k] float16/bfloat16/float32/float64, A [r, k] and B [N, d, r] of x's dtype,
    weights [T, K] float32 gate weights (float32 or float64 when x is float64), experts
    [T, K] int32 in [-1, N) (−1 = unused slot, its weight is ignored), scaling (alpha / r)
    a float, a_grad_mask [T] bool or None (A learns only from tokens where it is true;
    None = all tokens).
    Returns delta [T, d] in x's dtype; gradients flow to x, A, B and weights (in the
    weights' dtype).
    backend: "eager" | "triton" | None (see ``alter_kernels._dispatch``).
    check_expert_ids: verify that every id is in [-1, N), which costs one host sync on a
    GPU. Callers whose ids are in range by construction (the output of ``route``, a
    validated forced route: ``AsymLoRALinear``) pass False to keep the forward sync-free.
    """
    _check_inputs(x, A, B, weights, experts, scaling, a_grad_mask, check_expert_ids)
    chosen = resolve_backend(_OP, backend, x.device, _IMPLEMENTED)
    if chosen == "triton":
        return AsymLoRATriton.apply(x, A, B, weights, experts, float(scaling), a_grad_mask)
    return asym_lora_eager(x, A, B, weights, experts, scaling, a_grad_mask)
