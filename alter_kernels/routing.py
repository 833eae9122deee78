"""Entropy-gated top-k routing and token grouping by expert.

``route``: router logits + per-token entropy -> (weights [T, K] f32, experts [T, K] i32).
``moe_align``: groups the (token, slot) pairs of ``experts`` by expert for the grouped
AsymLoRA matmuls.

Routing (DESIGN.md §1): token t is high-entropy iff ``entropy[t] > threshold``; it then
keeps its top ``k_high`` experts at temperature ``tau_high``, else its top ``k_low`` at
``tau_low``. Kept experts are ordered by descending logit (ties: lower index first) and
weighted by the softmax of ``logit / tau`` over the kept ones. A ``-inf`` router logit
marks an expert as unavailable: it is never kept (its slot stays weight 0, expert -1).
NaN and ``+inf`` router logits are a ValueError; callers that skip that check (it costs a
host sync on a GPU) get the same answer from every backend: NaN ranks as ``+inf`` and the
row's weights are all NaN, so the NaN reaches the layer output instead of vanishing.
"""
from __future__ import annotations

import math
import numbers

import torch

from alter_kernels._dispatch import device_guard, resolve_backend
from alter_kernels._triton import tl, triton
from alter_kernels._validation import FLOAT_DTYPES, check_same_device, check_tensor

MAX_EXPERTS_PER_TOKEN = 64
MAX_TRITON_EXPERTS = 64  # the triton kernel holds a token's N logits in one tile


# ----------------------------------------------------------------------------- route


def _route_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64 (so the reference can be gradchecked)."""
    return torch.promote_types(dtype, torch.float32)


def route_eager(router_logits, entropy, threshold, tau_high, tau_low, k_high, k_low):
    """Eager reference of :func:`route`, differentiable by autograd.

    router_logits [T, N] float, entropy [T] float. Returns weights [T, K] in
    fp32 (fp64 for fp64 logits) and experts [T, K] int32, K = max(k_high, k_low).
    """
    logits = router_logits.to(_route_compute_dtype(router_logits.dtype))
    # NaN ranks as +inf (as in the triton kernel); the shift by +inf below makes the row NaN.
    logits = torch.where(torch.isnan(logits), float("inf"), logits)
    num_slots = max(k_high, k_low)
    high = entropy.float() > threshold
    tau = torch.tensor([tau_low, tau_high], dtype=logits.dtype, device=logits.device)[high.long()]  # [T]
    k = torch.where(high, k_high, k_low)  # [T]

    # A stable descending sort keeps equal logits in index order: ties go to the lower expert.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    top_logits, top_experts = sorted_logits[:, :num_slots], order[:, :num_slots]
    slot = torch.arange(num_slots, device=logits.device)
    kept = (slot < k[:, None]) & (top_logits > float("-inf"))

    # Softmax over the kept slots. Slot 0 holds the row max; subtracting it (before the
    # division by tau, which may be 0.01) keeps exp from overflowing. The shift is
    # detached: softmax does not depend on it.
    shift = top_logits[:, :1].detach()
    scaled = torch.where(kept, (top_logits - shift) / tau[:, None], float("-inf"))
    exp = torch.exp(scaled)  # 0 in slots not kept
    # A row with no kept slot (all logits -inf) gets all-zero weights instead of 0/0; a NaN
    # sum (a +inf logit) stays NaN.
    denom = exp.sum(dim=-1, keepdim=True)
    weights = exp / torch.where(denom == 0, 1.0, denom)
    experts = torch.where(kept, top_experts, -1).to(torch.int32)
    return weights, experts


def router_logits_with_entropy(projected: torch.Tensor, entropy: torch.Tensor,
                               entropy_weight: torch.Tensor) -> torch.Tensor:
    """Router logits ``l_t = W_g x_t + S_t·u`` [T, N] from ``projected`` = W_g x [T, N]
    (any float dtype), entropy S [T] and u [N]: upcast to at least float32, because
    low-entropy routing divides them by tau_low = 0.01."""
    logits = projected.to(_route_compute_dtype(projected.dtype))
    return torch.addcmul(logits, entropy[:, None].to(logits.dtype), entropy_weight.to(logits.dtype))


def route_constants(entropy: torch.Tensor, threshold: float, tau_high: float, tau_low: float, k_high: int,
                    k_low: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(k [T, 1] int64, tau [T, 1] ``dtype``): each token's number of kept experts and its
    temperature, from its entropy [T] (high iff ``entropy > threshold``), for :func:`dense_gate`."""
    high = (entropy > threshold)[:, None]
    k = torch.where(high, k_high, k_low)
    # tau from Python floats in the logits' dtype, as route builds it (no host-to-device copy)
    tau = torch.full(high.shape, tau_low, dtype=dtype, device=entropy.device).masked_fill_(high, tau_high)
    return k, tau


def dense_gate(router_logits: torch.Tensor, k: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The gate of ``alter_kernels.route`` as a dense matrix G [T, N] in the logits' dtype:
    G[t, e] = the weight ``route`` gives expert e for token t, 0 when e is not kept.

    router_logits [T, N] float32/float64; k [T, 1] int64 (experts kept per token) and tau
    [T, 1] (its temperature, the logits' dtype). An expert's rank is its position in a
    stable descending sort (ties: the lower index first, as ``route``). Differentiable in
    the logits as ``route``'s weights are; a NaN or +inf logit gives its row NaN weights.
    (A row of -inf logits only, which no finite router produces, gives NaN, not zeros.)
    """
    rank = router_logits.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    # The row max shifted out before the division by tau (0.01), as route does: dividing
    # first would round large logits / tau to a few bits of the differences that matter.
    shifted = router_logits - router_logits.detach().amax(dim=1, keepdim=True)
    return torch.softmax(torch.where(rank < k, shifted / tau, float("-inf")), dim=1)


if triton is not None:

    @triton.jit
    def _token_tile(num_tokens, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """This program's BLOCK_T token rows (int64) and which of them exist, and the
        column ids of its expert and slot tiles."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        return rows.to(tl.int64), rows < num_tokens, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)

    @triton.jit
    def _token_inverse_tau(entropy_ptr, rows64, row_ok, stride_entropy, threshold, inv_tau_high, inv_tau_low):
        """(high, 1/tau) per token: high entropy iff entropy > threshold."""
        ent = tl.load(entropy_ptr + rows64 * stride_entropy, mask=row_ok, other=0.0).to(tl.float32)
        high = ent > threshold
        return high, tl.where(high, inv_tau_high, inv_tau_low)

    @triton.jit
    def _route_forward_kernel(
        logits_ptr, entropy_ptr, weights_ptr, experts_ptr,
        num_tokens, num_experts, stride_logits_t, stride_logits_n, stride_entropy,
        threshold, inv_tau_high, inv_tau_low, k_high, k_low,
        NUM_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program routes BLOCK_T tokens; each token's N logits are one padded tile row."""
        rows64, row_ok, cols, slots = _token_tile(num_tokens, BLOCK_T, BLOCK_N, BLOCK_K)
        x = tl.load(
            logits_ptr + rows64[:, None] * stride_logits_t + cols[None, :] * stride_logits_n,
            mask=row_ok[:, None] & (cols[None, :] < num_experts),
            other=float("-inf"),
        ).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # NaN ranks as +inf, as on the eager path
        high, inv_tau = _token_inverse_tau(
            entropy_ptr, rows64, row_ok, stride_entropy, threshold, inv_tau_high, inv_tau_low
        )
        k = tl.where(high, k_high, k_low)

        # Top-k by repeated argmax-and-mask; picks land in slot j of the [BLOCK_T, BLOCK_K] tiles.
        top = tl.full((BLOCK_T, BLOCK_K), float("-inf"), tl.float32)
        top_experts = tl.full((BLOCK_T, BLOCK_K), -1, tl.int32)
        for j in tl.static_range(NUM_SLOTS):
            best = tl.max(x, axis=1)
            # lowest column holding the max: ties go to the lower expert index
            best_col = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_N), axis=1)
            take = ((slots[None, :] == j) & (k > j)[:, None]) & (best > float("-inf"))[:, None]
            top = tl.where(take, best[:, None], top)
            top_experts = tl.where(take, best_col[:, None], top_experts)
            x = tl.where(cols[None, :] == best_col[:, None], float("-inf"), x)

        # Softmax of logit/tau over the kept slots, shifted by the row max (no overflow at tau 0.01).
        row_max = tl.max(top, axis=1)
        shift = tl.where(row_max > float("-inf"), row_max, 0.0)
        exp = tl.exp2((top - shift[:, None]) * (inv_tau * 1.4426950408889634)[:, None])
        denom = tl.sum(exp, axis=1)
        # no kept slot: all-zero weights; a NaN sum (a +inf logit) keeps the row NaN
        weights = exp / tl.where(denom == 0.0, 1.0, denom)[:, None]

        out = rows64[:, None] * NUM_SLOTS + slots[None, :]
        out_mask = row_ok[:, None] & (slots[None, :] < NUM_SLOTS)
        tl.store(weights_ptr + out, weights, mask=out_mask)
        tl.store(experts_ptr + out, top_experts, mask=out_mask)

    @triton.jit
    def _route_backward_kernel(
        grad_weights_ptr, weights_ptr, experts_ptr, entropy_ptr, grad_logits_ptr,
        num_tokens, num_experts, stride_grad_t, stride_grad_k, stride_entropy,
        threshold, inv_tau_high, inv_tau_low,
        NUM_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """d logit_e = w_e / tau · (g_e − Σ_k w_k g_k) for kept e, 0 elsewhere; writes dense rows."""
        rows64, row_ok, cols, slots = _token_tile(num_tokens, BLOCK_T, BLOCK_N, BLOCK_K)
        slot_mask = row_ok[:, None] & (slots[None, :] < NUM_SLOTS)

        saved = rows64[:, None] * NUM_SLOTS + slots[None, :]
        w = tl.load(weights_ptr + saved, mask=slot_mask, other=0.0)
        e = tl.load(experts_ptr + saved, mask=slot_mask, other=-1)
        g = tl.load(
            grad_weights_ptr + rows64[:, None] * stride_grad_t + slots[None, :] * stride_grad_k,
            mask=slot_mask, other=0.0,
        ).to(tl.float32)
        _, inv_tau = _token_inverse_tau(
            entropy_ptr, rows64, row_ok, stride_entropy, threshold, inv_tau_high, inv_tau_low
        )

        # slots not kept have w = 0, so they contribute nothing
        grad_slots = w * (g - tl.sum(w * g, axis=1)[:, None]) * inv_tau[:, None]
        grad = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        for j in tl.static_range(NUM_SLOTS):
            in_slot = slots[None, :] == j
            grad_j = tl.sum(tl.where(in_slot, grad_slots, 0.0), axis=1)
            expert_j = tl.sum(tl.where(in_slot, e, 0), axis=1)
            grad += tl.where(cols[None, :] == expert_j[:, None], grad_j[:, None], 0.0)

        tl.store(
            grad_logits_ptr + rows64[:, None] * num_experts + cols[None, :],
            grad.to(grad_logits_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (cols[None, :] < num_experts),
        )


def route_launch_config(num_tokens: int, num_experts: int, num_slots: int):
    """Tile sizes: about 1024 logits per program (a few registers per thread at 4 warps)."""
    block_n = triton.next_power_of_2(num_experts)
    block_t = min(triton.next_power_of_2(max(num_tokens, 1)), max(16, 1024 // block_n))
    return dict(
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(num_slots), num_warps=4,
    ), (triton.cdiv(num_tokens, block_t),)


class _RouteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, router_logits, entropy, threshold, tau_high, tau_low, k_high, k_low):
        num_tokens, num_experts = router_logits.shape
        num_slots = max(k_high, k_low)
        weights = torch.empty(num_tokens, num_slots, dtype=torch.float32, device=router_logits.device)
        experts = torch.empty(num_tokens, num_slots, dtype=torch.int32, device=router_logits.device)
        meta, grid = route_launch_config(num_tokens, num_experts, num_slots)
        if num_tokens:
            with device_guard(router_logits.device):
                _route_forward_kernel[grid](
                    router_logits, entropy, weights, experts,
                    num_tokens, num_experts, router_logits.stride(0), router_logits.stride(1), entropy.stride(0),
                    float(threshold), 1.0 / tau_high, 1.0 / tau_low, k_high, k_low,
                    NUM_SLOTS=num_slots, **meta,
                )
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(weights, experts, entropy)
        ctx.threshold, ctx.inv_tau = float(threshold), (1.0 / tau_high, 1.0 / tau_low)
        ctx.logits_shape, ctx.logits_dtype = router_logits.shape, router_logits.dtype
        return weights, experts

    @staticmethod
    def backward(ctx, grad_weights, _grad_experts):
        weights, experts, entropy = ctx.saved_tensors
        num_tokens, num_experts = ctx.logits_shape
        num_slots = weights.shape[1]
        grad_logits = torch.empty(ctx.logits_shape, dtype=ctx.logits_dtype, device=weights.device)
        meta, grid = route_launch_config(num_tokens, num_experts, num_slots)
        if num_tokens:
            with device_guard(weights.device):
                _route_backward_kernel[grid](
                    grad_weights, weights, experts, entropy, grad_logits,
                    num_tokens, num_experts, grad_weights.stride(0), grad_weights.stride(1), entropy.stride(0),
                    ctx.threshold, *ctx.inv_tau,
                    NUM_SLOTS=num_slots, **meta,
                )
        return grad_logits, None, None, None, None, None, None


def _check_real(op: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{op}: {name} must not be NaN")
    if positive and not (0.0 < value < math.inf):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def _check_int(op: str, name: str, value, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return value


def check_router_logits_finite(op: str, router_logits: torch.Tensor) -> None:
    """Raise ValueError at the first NaN or +inf router logit (one host sync on a GPU)."""
    bad = torch.isnan(router_logits) | torch.isposinf(router_logits)
    if bool(bad.any()):
        t, e = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{op}: router_logits[{t}, {e}] = {float(router_logits[t, e])}; router logits must be "
            "finite or -inf (-inf marks an unavailable expert)"
        )


def route(router_logits, entropy, threshold, tau_high, tau_low, k_high, k_low, backend=None, check_finite=True):
    """Entropy-gated top-k routing (DESIGN.md §1, eq. 7 and 9 of the paper).

    Args:
        router_logits: [T, N] float (fp16/bf16/fp32/fp64), any strides.
        entropy: [T] float, on the same device; high entropy iff ``entropy > threshold``.
        threshold: entropy threshold (±inf allowed: every token low / high).
        tau_high, tau_low: softmax temperatures (> 0) of high- and low-entropy tokens.
        k_high, k_low: experts kept by high- and low-entropy tokens, 1 <= k_low <= k_high <= N.
        backend: "eager" | "triton" | None (see ``_dispatch``); triton needs N <= 64.
        check_finite: raise ValueError if a router logit is NaN or +inf (one host sync on
            a GPU). With False (``AsymLoRALinear``'s sync-free forward) every backend still
            answers alike: NaN ranks as +inf and such a row gets NaN in every weight.

    Returns:
        weights [T, K] float32 and experts [T, K] int32, K = max(k_high, k_low): the kept
        experts by descending logit (ties: lower index first) and their softmax weights
        of logit/tau (summing to 1); unused slots have weight 0 and expert -1. A ``-inf``
        logit marks an expert as unavailable (never kept). Gradients flow to
        ``router_logits`` through the weights, none to ``entropy``.
    """
    op = "route"
    check_tensor(op, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "entropy", entropy, ndim=1, dtypes=FLOAT_DTYPES)
    device = check_same_device(op, router_logits=router_logits, entropy=entropy)
    num_tokens, num_experts = router_logits.shape
    if entropy.shape[0] != num_tokens:
        raise ValueError(
            f"{op}: entropy must have shape [T] = [{num_tokens}] like router_logits.shape[0], "
            f"got {tuple(entropy.shape)}"
        )
    threshold = _check_real(op, "threshold", threshold)
    tau_high = _check_real(op, "tau_high", tau_high, positive=True)
    tau_low = _check_real(op, "tau_low", tau_low, positive=True)
    k_high = _check_int(op, "k_high", k_high, low=1, high=min(num_experts, MAX_EXPERTS_PER_TOKEN))
    k_low = _check_int(op, "k_low", k_low, low=1, high=k_high)
    if check_finite:
        check_router_logits_finite(op, router_logits)

    name = resolve_backend(op, backend, device, implemented=("eager", "triton"))
    if name == "triton" and num_experts > MAX_TRITON_EXPERTS:
        if backend == "triton":
            raise ValueError(
                f"{op}: the triton backend supports at most {MAX_TRITON_EXPERTS} experts "
                f"(router_logits.shape[1]), got {num_experts}; use backend='eager'"
            )
        name = "eager"  # chosen automatically: fall back rather than fail
    if name == "triton":
        return _RouteTriton.apply(router_logits, entropy, threshold, tau_high, tau_low, k_high, k_low)
    weights, experts = route_eager(router_logits, entropy, threshold, tau_high, tau_low, k_high, k_low)
    return weights.float(), experts


# ------------------------------------------------------------------------- moe_align

INT32_MAX = 2**31 - 1


def moe_align_capacity(numel: int, num_experts: int, block_m: int) -> int:
    """Blocks of ``sorted_ids`` in the worst case, ceil((T·K + N·(block_m − 1)) / block_m).

    Raises ValueError, with the compiled kernels' message, when the padded length does not
    fit the int32 outputs (checked before anything is allocated)."""
    max_padded = numel + num_experts * (block_m - 1)
    max_blocks = -(-max_padded // block_m)
    if max_blocks * block_m > INT32_MAX:
        raise ValueError(f"moe_align: T*K + num_experts*(block_m - 1) = {max_padded} does not fit in int32")
    return max_blocks


def moe_align_eager(experts: torch.Tensor, num_experts: int, block_m: int):
    """Eager reference of :func:`moe_align`.

    experts: [T, K] int32, values in [-1, num_experts). Returns
      sorted_ids   [ceil((T·K + N·(block_m − 1)) / block_m) · block_m] int32: flat slot
                   indices t·K + j grouped by
                   expert (ascending within a group), each group padded to a multiple of
                   block_m with T·K; entries past num_padded are T·K too;
      block_expert [len(sorted_ids) // block_m] int32: expert of each block, −1 past
                   num_padded;
      num_padded   [1] int32: used length of sorted_ids.
    Slots with expert −1 are left out.
    """
    numel = experts.numel()
    max_blocks = moe_align_capacity(numel, num_experts, block_m)
    device = experts.device
    flat = experts.reshape(-1).long()
    sorted_ids = torch.full((max_blocks * block_m,), numel, dtype=torch.int32, device=device)
    block_expert = torch.full((max_blocks,), -1, dtype=torch.int32, device=device)

    # Group sizes, and each group's start once every group is padded to a multiple of block_m.
    routed = (flat >= 0).nonzero().flatten()  # ascending slot indices
    counts = torch.bincount(flat[routed], minlength=num_experts)
    padded_counts = (counts + block_m - 1) // block_m * block_m
    group_start = torch.cumsum(padded_counts, 0) - padded_counts

    # A stable sort by expert keeps the slots of one expert in ascending order.
    by_expert = routed[torch.sort(flat[routed], stable=True).indices]
    expert_of = flat[by_expert]
    rank_in_group = torch.arange(by_expert.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    sorted_ids[group_start[expert_of] + rank_in_group] = by_expert.to(torch.int32)

    num_blocks = padded_counts // block_m
    used_blocks = int(num_blocks.sum())
    block_expert[:used_blocks] = torch.repeat_interleave(
        torch.arange(num_experts, dtype=torch.int32, device=device), num_blocks
    )
    num_padded = torch.tensor([used_blocks * block_m], dtype=torch.int32, device=device)
    return sorted_ids, block_expert, num_padded


def moe_align(experts, num_experts, block_m, backend=None):
    """Group the (token, slot) pairs of ``experts`` by expert, padded to ``block_m``.

    Args:
        experts: [T, K] int32 (as returned by :func:`route`), values in [-1, num_experts);
            -1 marks an unused slot.
        num_experts: N >= 1.
        block_m: block size of the grouped matmul, >= 1.
        backend: "eager" | "cpp" | None (see ``_dispatch``).

    Returns ``(sorted_ids, block_expert, num_padded)``, int32, as described in
    :func:`moe_align_eager`. Not differentiable.
    """
    op = "moe_align"
    check_tensor(op, "experts", experts, ndim=2, dtypes=(torch.int32,))
    num_experts = _check_int(op, "num_experts", num_experts, low=1)
    block_m = _check_int(op, "block_m", block_m, low=1)
    if experts.numel():
        lowest, highest = (int(v) for v in torch.aminmax(experts))  # one device sync
        if lowest < -1 or highest >= num_experts:
            bad = lowest if lowest < -1 else highest
            raise ValueError(
                f"{op}: experts holds expert id {bad}, outside [-1, num_experts) = [-1, {num_experts})"
            )
    return moe_align_unchecked(experts, num_experts, block_m, backend)


def moe_align_unchecked(experts: torch.Tensor, num_experts: int, block_m: int, backend=None):
    """:func:`moe_align` without its input checks, for callers that have validated
    ``experts`` already (the asym_lora backward): on a GPU the value check is a device sync."""
    name = resolve_backend("moe_align", backend, experts.device, implemented=("eager", "cpp"))
    if name == "cpp":
        return tuple(torch.ops.alter_kernels.moe_align(experts, num_experts, block_m))
    return moe_align_eager(experts, num_experts, block_m)
