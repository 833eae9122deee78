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
- Triton, forward: h = x A^T by cuBLAS, then one loop-free grouped GEMM,
  (s·G ⊗ h) [T, N·r] @ B_cat^T, in a kernel that forms the gated rank in registers from
  h and the routes (gate and scaling folded into h) and reads B_cat^T straight from B's
  [N, d, r] layout; K = N·r is not padded per expert. Each output tile is written once
  (no atomics, deterministic); with ``out`` (the base layer's output) the tile is loaded
  as the accumulator and the sum written in place, so the adapted layer writes its
  output once.
- Triton, backward: token-major, the output gradient g read twice by cuBLAS (no
  gather per (token, slot)): P = g B_cat [T, N·r], dB_cat = g^T (s·G ⊗ h); dh, dw, dA and
  dx follow from P on [T, N, r]-sized tensors.
"""
from __future__ import annotations

import math
import numbers

import torch

from alter_kernels._dispatch import device_guard, resolve_backend
from alter_kernels._triton import tl, triton
from alter_kernels._validation import FLOAT_DTYPES, check_same_device, check_tensor

_OP = "asym_lora"
_IMPLEMENTED = ("eager", "triton")


# --------------------------------------------------------------------------- eager


def asym_lora_shrink(x: torch.Tensor, A: torch.Tensor, a_grad_mask: torch.Tensor | None) -> torch.Tensor:
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
    h = asym_lora_shrink(x, A, a_grad_mask)
    delta = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(B.shape[0]):
        tokens, slots = (experts == e).nonzero(as_tuple=True)
        expert_out = h[tokens] @ B[e].t()  # [n_e, d]
        gate = weights[tokens, slots].to(x.dtype)[:, None]
        delta = delta.index_add(0, tokens, gate * expert_out)
    return scaling * delta


def _dense_gate(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """G [T, N]: G[t, e] = Σ_k w_tk [e_tk = e] (unused slots, expert −1, add nothing)."""
    used = experts >= 0
    return torch.zeros(experts.shape[0], num_experts, dtype=dtype, device=weights.device).scatter_add(
        1, experts.clamp(min=0).long(), torch.where(used, weights, 0.0).to(dtype)
    )


def b_cat(B: torch.Tensor) -> torch.Tensor:
    """B_cat [d, N·r]: the experts' B [N, d, r] laid side by side (column e·r + j = B[e, :, j])."""
    N, d, r = B.shape
    return B.permute(1, 0, 2).reshape(d, N * r)


def gated_rank(gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """G ⊗ h [T, N·r] from the dense gate G [T, N] and h = x A^T [T, r] (one dtype):
    column e·r + j holds G[t, e]·h[t, j], so that its product with B_cat^T is the expand."""
    return (gate[:, :, None] * h[:, None, :]).reshape(-1, gate.shape[1] * h.shape[1])


def asym_lora_eager_dense(x, A, B, weights, experts, scaling, a_grad_mask=None):
    """Fast plain-PyTorch :func:`asym_lora` (same contract as :func:`asym_lora_eager`).

    Scatters the gate into a dense G [T, N] (G[t, e] = Σ_k w_tk [e_tk = e]), so the
    expand is one GEMM of rank N·r: delta = s · (G ⊗ h) [T, N·r] @ B_cat^T with
    B_cat [d, N·r] = B laid side by side. No host syncs; memory O(T·N·r).
    """
    h = asym_lora_shrink(x, A, a_grad_mask)
    gate = _dense_gate(weights, experts, B.shape[0], x.dtype)
    return scaling * (gated_rank(gate, h) @ b_cat(B).t())


# --------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _gated_expand_kernel(
        h_ptr, B_ptr, weights_ptr, experts_ptr, scaling_ptr, out_ptr,
        T, d, stride_ot, stride_od,
        N: tl.constexpr, R: tl.constexpr, NUM_SLOTS: tl.constexpr, ACCUMULATE: tl.constexpr, K_STEPS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):
        """out[m-tile, n-tile] (+)= (s·G ⊗ h)[m-tile, :] @ B_cat^T[:, n-tile], K = N·r;
        h [T, R] and B [N, d, R] contiguous (each expert's R columns one vector load).

        Column c = e·r + j of the gated rank G ⊗ h is G[t, e]·h[t, j], with the gate
        G[t, e] = Σ_k w_tk [e_tk = e] formed from the routes in registers; B_cat^T[c, n] =
        B[e, n, j] is read straight from B's [N, d, r] layout. A grouped GEMM with no loop
        over experts and no padding of r: K is padded to BLOCK_KR as a whole (N·r = 64 at
        the Llama shapes: one step). ACCUMULATE: out holds the base layer's output; its
        tile is added to the fp32 accumulator and the sum stored in place, so the adapted
        layer writes its output once.
        Grid (cdiv(T, BLOCK_M), cdiv(d, BLOCK_N)); every output tile written once.
        """
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < T
        n_mask = offs_n < d
        rows = offs_m.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        scaling = tl.load(scaling_ptr)
        for step in tl.static_range(K_STEPS):  # K_STEPS = cdiv(N·r, BLOCK_KR): one at the Llama shapes
            cols = step * BLOCK_KR + tl.arange(0, BLOCK_KR)
            col_ok = cols < N * R
            col_expert = cols // R
            col_rank = cols % R
            gate = tl.zeros([BLOCK_M, BLOCK_KR], dtype=ACC_DTYPE)
            for slot in tl.static_range(NUM_SLOTS):  # unused slots (expert −1) match no column
                expert = tl.load(experts_ptr + rows * NUM_SLOTS + slot, mask=m_mask, other=-1)
                weight = tl.load(weights_ptr + rows * NUM_SLOTS + slot, mask=m_mask, other=0.0).to(ACC_DTYPE)
                gate += tl.where(expert[:, None] == col_expert[None, :], weight[:, None], 0.0)
            h = tl.load(
                h_ptr + rows[:, None] * R + col_rank[None, :],
                mask=m_mask[:, None] & col_ok[None, :], other=0.0,
            ).to(ACC_DTYPE)
            gated_h = (gate * h * scaling).to(DOT_DTYPE)
            b_t = tl.load(
                B_ptr + col_expert[:, None].to(tl.int64) * d * R + offs_n[None, :] * R + col_rank[:, None],
                mask=col_ok[:, None] & n_mask[None, :], other=0.0,
            ).to(DOT_DTYPE)
            acc = tl.dot(gated_h, b_t, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        # the output tile's pointers only now: live across the GEMM they cost ~2 registers per element
        out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_od
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(ACC_DTYPE)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Tiles of the expand kernel, as data: per architecture, rows (max tokens, max N·r,
# BLOCK_M, BLOCK_N, BLOCK_KR, num_warps, num_stages), the first row that fits wins.
# BLOCK_N is clipped to d (>= 16). The kernel streams the output (and the base output it
# accumulates into): small-T rows keep many programs in flight (decode: T/16 x d/64),
# large-T rows use 128 x 128 tiles (8 warps, wgmma on Hopper) to re-read B_cat less.
# Sized from the compile report (registers, no spills), not tuned on a GPU.
_HALF_TILES = (
    (64, 128, 16, 64, 128, 4, 3),
    (1024, 128, 64, 128, 128, 4, 3),
    (None, 128, 128, 128, 128, 8, 3),
    (None, None, 64, 128, 64, 4, 3),  # N·r > 128: K in steps of 64
)
EXPAND_TILES = {
    90: _HALF_TILES,
    80: _HALF_TILES,
    # fp32 / fp64 tiles: no tensor cores, smaller tiles
    "wide": ((64, None, 16, 64, 64, 4, 2), (None, None, 64, 64, 32, 4, 2)),
    # the interpreter: small tiles, so that the tests cover several tiles and K steps
    "interpret": ((None, None, 16, 32, 16, 4, 1),),
}


def _gpu_arch(device: torch.device) -> int | None:
    """Compute capability (90, 80, ...) of a CUDA device; None off the GPU (the
    interpreter). benchmarks/compile_report.py replaces it to compile for a target."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_dtypes(device: torch.device, dtype: torch.dtype) -> dict:
    """The ``tl.dot`` operand and accumulator dtypes and precision for ``dtype`` tiles:
    on a GPU half tiles go to tensor cores as they are (fp32 accumulation) and fp32
    tiles use exact fp32 products ("ieee", as torch's default matmul); the interpreter's
    bf16/fp16 dot is unreliable, so there tiles are cast to fp32. float64 stays float64."""
    if dtype == torch.float64:
        dot_dtype, acc_dtype = tl.float64, tl.float64
    elif _gpu_arch(device) is None or dtype == torch.float32:
        dot_dtype, acc_dtype = tl.float32, tl.float32
    else:
        dot_dtype, acc_dtype = (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), tl.float32
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32", ACC_DTYPE=acc_dtype)


def expand_config(device: torch.device, dtype: torch.dtype, T: int, d: int, nr: int) -> dict:
    """Launch meta-parameters of the expand kernel for T tokens, d features and K = N·r
    (the dtypes: :func:`dot_dtypes`)."""
    arch = _gpu_arch(device)
    dots = dot_dtypes(device, dtype)
    dot_dtype = dots["DOT_DTYPE"]
    if arch is None:
        table = EXPAND_TILES["interpret"]
    elif dot_dtype in (tl.float32, tl.float64):
        table = EXPAND_TILES["wide"]
    else:
        table = EXPAND_TILES[90 if arch >= 90 else 80]
    for max_tokens, max_nr, block_m, block_n, block_kr, num_warps, num_stages in table:
        if (max_tokens is None or T <= max_tokens) and (max_nr is None or nr <= max_nr):
            break
    return dict(
        BLOCK_M=block_m, BLOCK_N=min(block_n, max(16, triton.next_power_of_2(d))),
        BLOCK_KR=min(block_kr, max(16, triton.next_power_of_2(nr))),  # tl.dot needs every dim >= 16
        **dots, num_warps=num_warps, num_stages=num_stages,
    )


class AsymLoRATriton(torch.autograd.Function):
    """Triton forward / cuBLAS backward of :func:`asym_lora` (inputs already validated).

    Forward: h = x A^T (cuBLAS), then the gated expand kernel, into a new tensor or added
    into ``out`` in place. Backward, token-major, with g [T, d] the output gradient read
    twice through cuBLAS (no gather of g per slot, no grouping of slots by expert):
    P = g B_cat [T, N·r] and dB_cat = g^T (s·G ⊗ h); then on [T, N, r]-sized tensors
    dh_t = s Σ_e G_te P_te, dG_te = s h_t · P_te (dw_tk = dG_{t, e_tk}), dx = dh A and
    dA = (m ⊙ dh)^T x.
    """

    @staticmethod
    def forward(ctx, x, A, B, weights, experts, scaling, a_grad_mask, out):
        T, K = experts.shape
        N, d, r = B.shape
        meta = expand_config(x.device, x.dtype, T, d, N * r)
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x @ A.t()
        # contiguous h, B (small: T·r and N·d·r): the kernel addresses them with constexpr r
        h_rows, B_rows = h.contiguous(), B.contiguous()
        weights, experts = weights.contiguous(), experts.contiguous()
        # a device scalar, so that float64 calls keep a float64 scale
        scaling_t = torch.full((1,), scaling, dtype=acc_dtype, device=x.device)
        accumulate = out is not None
        rows = out.view(T, d) if accumulate else torch.empty(T, d, dtype=x.dtype, device=x.device)
        if T:
            grid = (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"]))
            with device_guard(x.device):
                _gated_expand_kernel[grid](
                    h_rows, B_rows, weights, experts, scaling_t, rows,
                    T, d, rows.stride(0), rows.stride(1),
                    N=N, R=r, NUM_SLOTS=K, ACCUMULATE=accumulate, K_STEPS=triton.cdiv(N * r, meta["BLOCK_KR"]),
                    **meta,
                )
        if accumulate:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, weights, experts, h, a_grad_mask)
        ctx.scaling, ctx.acc_dtype = scaling, acc_dtype
        return out if accumulate else rows

    @staticmethod
    def backward(ctx, grad_result):
        x, A, B, weights, experts, h, a_grad_mask = ctx.saved_tensors
        need_x, need_A, need_B, need_weights = ctx.needs_input_grad[:4]
        T, K = experts.shape
        N, d, r = B.shape
        s, acc = ctx.scaling, ctx.acc_dtype
        grad_out = grad_result.reshape(T, d)  # [..., d] when accumulating into out
        gate = _dense_gate(weights, experts, N, acc)
        grad_x = grad_A = grad_B = grad_weights = None
        if need_x or need_A or need_weights:
            projected = (grad_out @ b_cat(B)).view(T, N, r).to(acc)  # P
            if need_weights:
                grad_gate = s * (projected * h.to(acc)[:, None, :]).sum(dim=2)
                grad_weights = torch.where(
                    experts >= 0, grad_gate.gather(1, experts.clamp(min=0).long()), 0.0
                ).to(weights.dtype)
            grad_h = (s * (gate[:, :, None] * projected).sum(dim=1)).to(x.dtype)
            if need_x:
                grad_x = grad_h @ A
            if need_A:
                if a_grad_mask is not None:
                    grad_h = grad_h * a_grad_mask[:, None]
                grad_A = grad_h.t() @ x
        if need_B:
            gated_h = (s * gate[:, :, None] * h.to(acc)[:, None, :]).to(x.dtype).view(T, N * r)
            grad_B = (grad_out.t() @ gated_h).view(d, N, r).permute(1, 0, 2)
        grad_base = grad_result if ctx.needs_input_grad[7] else None
        return grad_x, grad_A, grad_B, grad_weights, None, None, None, grad_base


# --------------------------------------------------------------------------- public op


def _check_inputs(x, A, B, weights, experts, scaling, a_grad_mask, check_expert_ids, out) -> None:
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
    if out is not None:
        d = B.shape[1]
        check_tensor(_OP, "out", out, min_ndim=1, dtypes=(x.dtype,))
        check_same_device(_OP, x=x, out=out)
        if out.shape[-1] != d or out.numel() != T * d or not _viewable(out, d):
            raise ValueError(
                f"{_OP}: out must be [..., d={d}] with T={T} rows, viewable as [T, d] (no copy), "
                f"got shape {tuple(out.shape)} and strides {out.stride()}"
            )
    if check_expert_ids and experts.numel():
        lowest, highest = (int(v) for v in torch.aminmax(experts))
        bad = lowest if lowest < -1 else highest if highest >= N else None
        if bad is not None:
            raise ValueError(f"{_OP}: experts holds id {bad}, outside [-1, {N}) for N={N} experts")


def _viewable(t: torch.Tensor, d: int) -> bool:
    try:
        t.view(-1, d)
    except RuntimeError:
        return False
    return True


def asym_lora(x, A, B, weights, experts, scaling, a_grad_mask=None, backend=None, check_expert_ids=True, out=None):
    """Entropy-gated grouped AsymLoRA delta (forward and backward; see the module doc).

    x [T, k] float16/bfloat16/float32/float64, A [r, k] and B [N, d, r] of x's dtype,
    weights [T, K] float32 gate weights (float32 or float64 when x is float64), experts
    [T, K] int32 in [-1, N) (−1 = unused slot, its weight is ignored), scaling (alpha / r)
    a float, a_grad_mask [T] bool or None (A learns only from tokens where it is true;
    None = all tokens).
    Returns delta [T, d] in x's dtype (``out`` + delta with ``out``); gradients flow to
    x, A, B and weights (in the weights' dtype).
    backend: "eager" | "triton" | None (see ``alter_kernels._dispatch``).
    check_expert_ids: verify that every id is in [-1, N), which costs one host sync on a
    GPU. Callers whose ids are in range by construction (the output of ``route``, a
    validated forced route: ``AsymLoRALinear``) pass False to keep the forward sync-free.
    out: None, or a tensor of x's dtype (the base layer's output), [T, d] or [..., d] viewable
    as [T, d], that the delta is added to in place and that is returned:
    ``out + delta`` without another pass over the output. Gradients flow as through
    ``out + delta``; as for any in-place op, ``out`` must not be a leaf that requires grad,
    nor a tensor the op that produced it saved, nor a view (pass the whole tensor: an
    in-place custom autograd op on a view gets wrong gradients).
    """
    _check_inputs(x, A, B, weights, experts, scaling, a_grad_mask, check_expert_ids, out)
    chosen = resolve_backend(_OP, backend, x.device, _IMPLEMENTED)
    if chosen == "triton":
        return AsymLoRATriton.apply(x, A, B, weights, experts, float(scaling), a_grad_mask, out)
    delta = asym_lora_eager(x, A, B, weights, experts, scaling, a_grad_mask)
    if out is None:
        return delta
    out.view(delta.shape).add_(delta)
    return out
