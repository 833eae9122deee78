"""``AsymLoRALinear``: a frozen ``nn.Linear`` plus the entropy-routed asymmetric LoRA of
DESIGN §1 (eq. 6 and 9 of the paper).

    y_t = W0 x_t + b + s · Σ_k w_tk · B_{e_tk} A x_t,        s = alpha / r

with one shared A [r, in], N experts B [N, out, r] (expert 0 retains, 1..N-1 forget) and
a router whose logits ``l_t = W_g x_t + S_t·u_g`` are routed by ``alter_kernels.route``
(or forced per sample during training). The grouped shrink/expand is
``alter_kernels.asym_lora``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from alter.config import AlterConfig
from alter.adapters.state import CallState, EntropyTracker
from alter_kernels import asym_lora, route
from alter_kernels.asym_lora import asym_lora_shrink, b_cat, gated_rank
from alter_kernels.gated_asym_lora import choose_backend, run_gated_asym_lora
from alter_kernels.routing import dense_gate, route_constants, router_logits_with_entropy

# Tokens per call up to which a layer runs every expert densely on any device (decode).
DENSE_TOKENS = 16


class AlterRouter(nn.Module):
    """Router logits ``l_t = W_g x_t + S_t·u_g`` of one adapted layer.

    weight (W_g): [N, in]; entropy_weight (u_g): [N]; both start at zero.
    """

    def __init__(self, in_features: int, num_experts: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.num_experts = in_features, num_experts
        self.weight = nn.Parameter(torch.zeros(num_experts, in_features, dtype=dtype, device=device))
        self.entropy_weight = nn.Parameter(torch.zeros(num_experts, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, entropy: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] any float dtype, entropy [T] float32 -> logits [T, N], at least float32.

        The matmul runs in x's dtype (no float32 copy of x); the logits are then upcast
        because low-entropy routing divides them by tau_low = 0.01. ``projected``: ``W_g x``
        [T, N] when the caller computed it (fused with the adapter's shrink), so that the
        router still runs as a module (its hooks see every call).
        """
        projected = F.linear(x, self.weight.to(x.dtype)) if projected is None else projected
        return router_logits_with_entropy(projected, entropy, self.entropy_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}"


class AsymLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with an entropy-routed asymmetric LoRA adapter.

    Args:
      base_layer: the ``nn.Linear`` to adapt (frozen here, kept as ``base_layer``).
      config: rank, alpha, dropout, num_experts and the routing settings (read at each
        forward, so routing settings can be changed on a live model).
      tracker: the model's :class:`EntropyTracker`; a layer used on its own gets its own.

    Parameters: ``lora_A`` [r, in] (Kaiming-uniform, a=√5), ``lora_B`` [N, out, r]
    (zeros, so a fresh layer computes exactly its base layer), ``router.weight`` [N, in]
    and ``router.entropy_weight`` [N] (zeros). They are float32 when the base layer is
    fp16/bf16 (stable optimiser updates, as PEFT does) and the base dtype otherwise.

    forward(x [..., in]) -> [..., out] in the base layer's output dtype (x's dtype, or the
    autocast dtype under autocast); the adapter runs in x's dtype (the parameters are
    cast to it). Per-token entropy and forced routes come from the state of the model
    call the layer runs in (``tracker.call_state()``; a layer called on its own reads what
    was given to its tracker), in the token order of ``x.reshape(-1, in)``. In training mode, with
    ``config.a_learns_from_high_entropy_only``, lora_A learns only from tokens whose
    entropy exceeds ``config.entropy_threshold``.

    Paths, under the dispatcher's choice (no backend named): on the CPU, and for calls of
    <= ``DENSE_TOKENS`` tokens elsewhere, every expert runs densely with the top-k gate as
    a mask (:func:`dense_path`); without autograd that is one :func:`gated_asym_lora` call
    on weights laid out once (decode: one op per layer). Otherwise ``route`` and the grouped
    ``asym_lora``.
    """

    def __init__(self, base_layer: nn.Linear, config: AlterConfig, tracker: EntropyTracker | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"AsymLoRALinear: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(config, AlterConfig):
            raise TypeError(f"AsymLoRALinear: config must be an AlterConfig, got {type(config).__name__}")
        if tracker is not None and tracker.config is not config:
            raise ValueError("AsymLoRALinear: tracker.config must be the config given to the layer")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.num_experts = config.r, config.num_experts
        self.scaling = config.scaling
        self.tracker = tracker if tracker is not None else EntropyTracker(config)

        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = dict(dtype=dtype, device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, self.out_features, self.r, **factory))
        self.router = AlterRouter(self.in_features, self.num_experts, **factory)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracker = self.tracker
        config = tracker.config
        state = tracker.call_state()
        if not state.adapters_enabled:
            return self.base_layer(x)
        result = self.base_layer(x)
        tokens = x.reshape(-1, self.in_features)
        num_tokens = tokens.shape[0]
        # The delta goes straight into the base output (the output is written once),
        # unless autocast gave the base output another dtype than x.
        into_result = result.dtype == x.dtype and result.is_contiguous()
        if state.forced_experts is None and self._fused_inference() and dense_path(config, num_tokens, x.device):
            return self._add_fused_delta(result, tokens, state, into_result)
        entropy = tracker.token_entropy(state, num_tokens, x.device)
        forced = tracker.token_experts(state, num_tokens, x.device)
        # The experts that gate: forced ones, else the sequence route, else the router's.
        gating = forced if forced is not None and state.gate_forced else tracker.token_route(state, num_tokens, x.device)
        a_grad_mask = None
        if self.training and config.a_learns_from_high_entropy_only and entropy is not None:  # None: no autograd
            a_grad_mask = entropy > config.entropy_threshold
        lora_A, lora_B = self.lora_A, self.lora_B
        if state.adapters_frozen:
            lora_A, lora_B = _zero_gradient(lora_A), _zero_gradient(lora_B)
        elif state.frozen_experts:
            lora_B = _zero_gradient(lora_B, state.frozen_experts)
        if dense_path(config, num_tokens, x.device):
            delta = self._dense_delta(tokens, state, entropy, forced, gating, lora_A, lora_B, a_grad_mask)
            if into_result:
                result.view(num_tokens, self.out_features).addmm_(*delta)
                return result
            return result + (delta[0] @ delta[1]).reshape(*x.shape[:-1], self.out_features).to(result.dtype)
        if forced is not None or gating is None:
            router_logits = self.router(tokens, entropy)
            if forced is not None:
                tracker.record_router_logits(state, self, router_logits, forced)
        if gating is None:
            weights, experts = route(
                router_logits,
                entropy,
                config.entropy_threshold,
                config.tau_high,
                config.tau_low,
                config.k_high,
                config.k_low,
                backend=config.backend,
                check_finite=False,  # no per-layer host sync; a NaN/+inf row gives NaN weights on every backend
            )
        else:
            experts = gating[:, None]
            weights = torch.ones(num_tokens, 1, dtype=torch.float32, device=x.device)
        out = asym_lora(
            self.dropout(tokens),
            lora_A.to(x.dtype),
            lora_B.to(x.dtype),
            weights,
            experts,
            self.scaling,
            a_grad_mask=a_grad_mask,
            backend=config.backend,
            check_expert_ids=False,  # route() output or a forced route the tracker validated
            out=result if into_result else None,
        )
        if into_result:
            return out
        return result + out.reshape(*x.shape[:-1], self.out_features).to(result.dtype)

    def _dense_delta(self, tokens, state, entropy, forced, gating, lora_A, lora_B, a_grad_mask):
        """The dense path (:func:`dense_path`): (G ⊗ h [T, N·r], s·B_cat^T [N·r, out]),
        whose product is the delta; G is the one-hot of ``gating`` [T] (forced or
        sequence-routed experts) when given, else the routers' top-k gate. The router and the shrink share one matmul when the
        adapter input is the router's (no dropout, no a_grad_mask); without autograd the
        stacked and laid-out weights are kept between calls (:meth:`_inference_weights`).
        The router runs only when it gates or its logits are recorded (forced experts)."""
        tracker, N, dtype = self.tracker, self.num_experts, tokens.dtype
        routed = forced is not None or gating is None
        # the kept weights are keyed by data pointers, which a compiled graph cannot read
        live = torch.is_grad_enabled() or torch.compiler.is_compiling()
        if a_grad_mask is None and (not self.training or isinstance(self.dropout, nn.Identity)):
            stacked, b_t = (
                (torch.cat([self.router.weight.to(dtype), lora_A.to(dtype)]), None) if live
                else self._inference_weights(dtype)
            )
            shrunk = F.linear(tokens, stacked)  # [T, N + r]: W_g x, then A x
            router_logits = self.router(tokens, entropy, shrunk[:, :N]) if routed else None
            h = shrunk[:, N:]
        else:
            router_logits = self.router(tokens, entropy) if routed else None
            h, b_t = asym_lora_shrink(self.dropout(tokens), lora_A.to(dtype), a_grad_mask), None
            if not live:
                b_t = self._inference_weights(dtype)[1]
        if forced is not None:
            tracker.record_router_logits(state, self, router_logits, forced)
        if gating is None:
            k, tau = routing_constants(state, entropy, self.tracker.config, router_logits.dtype)
            gate = dense_gate(router_logits, k, tau).to(dtype)
        else:
            gate = F.one_hot(gating.long(), N).to(dtype)
        if b_t is None:
            gate = gate * self.scaling
            b_t = b_cat(lora_B.to(dtype)).t()
        return gated_rank(gate, h), b_t

    def _fused_inference(self) -> bool:
        """Whether a call without a forced route may run the dense path as one
        :func:`gated_asym_lora` call: without autograd (A's entropy mask only shapes
        gradients), not in a compiled graph (it cannot read the kept weights' keys), not
        under autocast (whose dtypes the composition follows), no dropout in use, and no
        hook on the router to see its logits."""
        router = self.router
        dropout = self.training and not isinstance(self.dropout, nn.Identity)
        return (not torch.is_grad_enabled() and not dropout and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(router.weight.device.type)
                and not router._forward_hooks and not router._forward_pre_hooks)

    def _add_fused_delta(self, result, tokens, state, into_result):
        """``result`` + the adapter's delta by :func:`gated_asym_lora` (its inputs are right
        by construction: unchecked, no host sync). The tokens' entropy, their sequence route
        and the op's backend are looked up once per model call (every layer reads the same)."""
        num_tokens, tracker = tokens.shape[0], self.tracker
        key = ("tokens", tokens.device, num_tokens)
        looked_up = state.routing.get(key)
        if looked_up is None:
            entropy = tracker.token_entropy(state, num_tokens, tokens.device)
            if entropy is None:  # a route-gated call: the op reads no entropy where experts are given
                entropy = torch.zeros(num_tokens, dtype=torch.float32, device=tokens.device)
            looked_up = state.routing[key] = (entropy, tracker.token_route(state, num_tokens, tokens.device),
                                              choose_backend(tokens.device))
        entropy, gating, backend = looked_up
        stacked, expand = self._inference_weights(tokens.dtype)
        delta = result.view(num_tokens, self.out_features) if into_result else tokens.new_zeros(
            num_tokens, self.out_features)
        threshold, tau_high, tau_low, k_high, k_low = route_settings(tracker.config)
        run_gated_asym_lora(backend, delta, tokens, stacked, self.router.entropy_weight, entropy, expand,
                            self.num_experts, threshold, tau_high, tau_low, k_high, k_low, gating)
        if into_result:
            return result
        return result + delta.reshape(*result.shape[:-1], self.out_features).to(result.dtype)

    def _inference_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_g over A [N + r, in], s·B_cat^T [N·r, out]) in ``dtype``, for calls without
        autograd: rebuilt when a parameter changed (in-place updates bump ``_version``),
        else kept (a decode step would otherwise copy every layer's B). Costs one copy of
        the adapter weights."""
        params = (self.router.weight, self.lora_A, self.lora_B)
        key = tuple((p.data_ptr(), p._version) for p in params) + (dtype,)
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                stacked = torch.cat([self.router.weight.to(dtype), self.lora_A.to(dtype)])
                b_t = (b_cat(self.lora_B.to(dtype)) * self.scaling).t()
            # the detached aliases keep the parameters' storage alive: a data_ptr in the key
            # cannot be reused by another tensor while the cache holds it
            cached = (key, stacked, b_t.contiguous(), [p.detach() for p in params])
            self.__dict__["_inference_cache"] = cached
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"num_experts={self.num_experts}, scaling={self.scaling:g}"
        )


def dense_path(config: AlterConfig, num_tokens: int, device: torch.device) -> bool:
    """Whether a layer under the dispatcher's choice (no backend named by the config or
    ``ALTER_BACKEND``) runs every expert on every token with the top-k gate as a mask:
    always on the CPU, where it beats grouping tokens by expert at every size measured
    (benchmarks/RESULTS.md), and for a decode-sized call (<= ``DENSE_TOKENS`` tokens)
    elsewhere, where a few fixed-shape ops with no host sync beat the grouped kernels."""
    if config.backend is not None or os.environ.get("ALTER_BACKEND"):
        return False
    return num_tokens <= DENSE_TOKENS or device.type == "cpu"


def routing_constants(state: CallState, entropy: torch.Tensor, config: AlterConfig, dtype: torch.dtype):
    """(k [T, 1] int64, tau [T, 1] ``dtype``): each token's number of experts and routing
    temperature, from its entropy [T]; computed once per call, shared by its layers."""
    key = (entropy.device, dtype, entropy.numel())
    constants = state.routing.get(key)
    if constants is None:
        constants = state.routing[key] = route_constants(entropy, *route_settings(config), dtype)
    return constants


def route_settings(config: AlterConfig) -> tuple[float, float, float, int, int]:
    """(threshold, tau_high, tau_low, k_high, k_low): the config's routing, in the order
    the routing ops take it."""
    return config.entropy_threshold, config.tau_high, config.tau_low, config.k_high, config.k_low


def _zero_gradient(weight: torch.Tensor, rows: tuple[int, ...] | None = None) -> torch.Tensor:
    """``weight`` with the same values whose gradient is exactly zero (in ``rows`` of its
    first dimension, or everywhere): the parameter still takes part in the backward, as
    DDP needs of every parameter in every step, but learns nothing from this call."""
    if rows is None:
        return weight * 0 + weight.detach()
    keep = torch.ones(weight.shape[0], *(1,) * (weight.dim() - 1), dtype=weight.dtype, device=weight.device)
    for row in rows:  # a fill per row on the device: no index tensor copied from the host per layer
        keep[row] = 0
    return weight * keep + weight.detach() * (1 - keep)
