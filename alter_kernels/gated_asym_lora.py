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
- cpp (CPU): ``torch.ops.alter_kernels.gated_asym_lora_``, the same two GEMMs and the gate
  in a C++ loop, in one call: at decode sizes (a few tokens, N·r <= 128) a layer's cost
  is the Python dispatch of a dozen small ops, not their FLOPs.

Inference only: no backward (the op refuses inputs that require grad under autograd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alter_kernels._dispatch import resolve_backend
from alter_kernels._validation import FLOAT_DTYPES, check_same_device, check_tensor
from alter_kernels.asym_lora import gated_rank
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
    "cpp" | None. check_inputs: False skips the checks (and the host sync that checks
    ``experts``) for callers whose inputs are right by construction (``AsymLoRALinear``).
    """
    if check_inputs:
        _check_inputs(out, x, stacked, entropy_weight, entropy, expand, num_experts, k_high, k_low, experts)
        threshold = _check_real(_OP, "threshold", threshold)
        tau_high = _check_real(_OP, "tau_high", tau_high, positive=True)
        tau_low = _check_real(_OP, "tau_low", tau_low, positive=True)
    args = (out, x, stacked, entropy_weight, entropy, expand, num_experts, threshold, tau_high, tau_low, k_high, k_low,
            experts)
    implemented = ("eager", "cpp") if x.device.type == "cpu" else ("eager",)  # the C++ kernel is CPU-only
    if resolve_backend(_OP, backend, x.device, implemented) == "cpp":
        torch.ops.alter_kernels.gated_asym_lora_(*args)
        return out
    return gated_asym_lora_eager(*args)
