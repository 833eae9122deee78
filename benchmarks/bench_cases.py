"""Benchmark cases of every op: a :class:`BenchCase` is one workload and the variants
(backends, baselines) that run it. Shapes depend on the device: CPU-sized on the CPU
(``quick`` shrinks them further for CI), Llama-3-8B-sized on a GPU. The model-level cases
are in ``bench_models.py``; ``harness.py`` times them all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from alter.config import AlterConfig

Step = Callable[[], object]

# Groups of model-level cases (fewer rounds on a GPU; tokens per second in the table).
MODEL_GROUPS = ("train_step", "inference")
# The settings the ALTER defaults use, so that the op cases time what training runs.
DEFAULTS = AlterConfig()
# Variants that are not a backend name: each case's baselines, the dispatcher's choice and the
# methods of the step-cost case.
NON_BACKEND_VARIANTS = ("linear", "loop", "eager_dense", "base", "kernels", "asym_lora", "alter", "alter-token",
                        "apart")


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked workload, run by several variants (the first is the baseline).

    ``build(variant, device)`` creates the inputs and returns a closure that runs one
    iteration (gradients it creates are dropped before it returns, so every call starts
    from the same state). ``bytes_moved`` / ``flops`` (per iteration) give the roofline
    fraction on a GPU; ``tokens`` gives tokens per second.
    """

    name: str
    group: str
    variants: tuple[str, ...]
    build: Callable[[str, torch.device], Step]
    bytes_moved: float | None = None
    flops: float | None = None
    tokens: int | None = None

    @property
    def model_level(self) -> bool:
        return self.group in MODEL_GROUPS


def variant_unavailable(variant: str, device: torch.device) -> str | None:
    """Why ``variant`` cannot run on ``device`` (None when it can): backends only."""
    from alter_kernels._dispatch import unavailable_reason

    if variant in NON_BACKEND_VARIANTS:
        return None
    return unavailable_reason(variant, device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _drop_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def _upstream_gradient(shape, dtype, device) -> torch.Tensor:
    """A dense random gradient for ``out.backward``: ``out.sum().backward()`` would hand the
    backward a stride-0 gradient whose every load hits one cached address."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(shape, generator=gen).to(device, dtype)


# ----------------------------------------------------------------------------------
# op cases
# ----------------------------------------------------------------------------------


def _logits(T: int, V: int, dtype, device, requires_grad: bool) -> torch.Tensor:
    """Random logits with a spread like a trained model's (scale 3)."""
    logits = torch.randn(T, V, device=device, dtype=torch.float32).mul_(3).to(dtype)
    return logits.requires_grad_(requires_grad)


def _entropy_case(T: int, V: int, dtype, backward: bool, variants) -> BenchCase:
    from alter_kernels import tsallis_entropy

    def build(variant, device):
        logits = _logits(T, V, dtype, device, backward)
        grad = _upstream_gradient((T,), torch.float32, device)

        def step():
            entropy = tsallis_entropy(logits, DEFAULTS.tsallis_q, backend=variant)
            if backward:
                entropy.backward(grad)
                _drop_grads(logits)

        return step

    elem = torch.finfo(dtype).bits // 8
    kind = "fwd+bwd" if backward else "fwd"
    # the forward reads the logits once; the backward reads them again and writes the gradient
    return BenchCase(
        f"tsallis_entropy {kind} [{T}x{V}] {_dtype_name(dtype)}", "tsallis_entropy", variants, build,
        bytes_moved=T * V * elem * (3 if backward else 1),
    )


def _fused_linear_entropy_case(T: int, D: int, V: int, dtype, variants) -> BenchCase:
    """The entropy prepass: entropy of softmax(hidden @ lm_head.T), no gradient."""
    from alter_kernels import fused_linear_entropy

    def build(variant, device):
        hidden = torch.randn(T, D, device=device, dtype=dtype)
        weight = (torch.randn(V, D, device=device) / D**0.5).to(dtype)

        def step():
            with torch.no_grad():
                fused_linear_entropy(hidden, weight, DEFAULTS.tsallis_q, backend=variant)

        return step

    elem = torch.finfo(dtype).bits // 8
    return BenchCase(
        f"fused_linear_entropy fwd [{T}x{D}]->[{V}] {_dtype_name(dtype)}", "fused_linear_entropy", variants,
        build, flops=2 * T * D * V, bytes_moved=elem * (T * D + V * D), tokens=T,
    )


def _ihl_case(T: int, V: int, dtype, variants) -> BenchCase:
    from alter_kernels import inverted_hinge_loss

    def build(variant, device):
        logits = _logits(T, V, dtype, device, True)
        labels = torch.randint(0, V, (T,), device=device)
        labels[::7] = -100

        def step():
            # Random logits are all high-entropy: a nonzero weight keeps every token in the loss.
            loss, _ = inverted_hinge_loss(
                logits, labels, DEFAULTS.tsallis_q, DEFAULTS.entropy_threshold, high_entropy_weight=0.1,
                backend=variant,
            )
            loss.backward()
            _drop_grads(logits)

        return step

    elem = torch.finfo(dtype).bits // 8
    return BenchCase(
        f"inverted_hinge_loss fwd+bwd [{T}x{V}] {_dtype_name(dtype)}", "inverted_hinge_loss", variants, build,
        bytes_moved=T * V * elem * 3,
    )


def _token_losses_case(T: int, V: int, dtype, variants) -> BenchCase:
    """ALTER's loss terms of one batch, NLL + IHL + entropy drift, forward and backward:
    ``token_losses`` on each backend, and ``apart``: the per-op kernels the dispatcher picks
    (``inverted_hinge_loss``, ``tsallis_entropy``, ``F.cross_entropy``), as ALTER ran them
    before ``token_losses``."""
    from alter_kernels import inverted_hinge_loss, token_losses, tsallis_entropy

    q, threshold = DEFAULTS.tsallis_q, DEFAULTS.entropy_threshold

    def build(variant, device):
        logits = _logits(T, V, dtype, device, True)
        labels = torch.randint(0, V, (T,), device=device)
        labels[::7] = -100
        base_entropy = torch.rand(T, device=device) * 3

        def step():
            if variant == "apart":
                ihl, _ = inverted_hinge_loss(logits, labels, q, threshold, high_entropy_weight=0.1)
                nll = F.cross_entropy(logits.float(), labels)
                entropy = tsallis_entropy(logits, q)
            else:
                losses = token_losses(logits, labels, q, threshold, 0.1, backend=variant)
                ihl, nll, entropy = losses.ihl.mean(), losses.nll.mean(), losses.entropy
            (ihl + nll + ((entropy - base_entropy) ** 2).mean()).backward()
            _drop_grads(logits)

        return step

    elem = torch.finfo(dtype).bits // 8
    return BenchCase(f"token_losses fwd+bwd [{T}x{V}] {_dtype_name(dtype)}", "token_losses", variants, build,
                     bytes_moved=T * V * elem * 3)


def _gated_asym_lora_case(T: int, k: int, d: int, r: int, N: int, dtype, variants) -> BenchCase:
    """One adapted layer's routed delta without autograd at decode size (T tokens), into
    the base output: ``gated_asym_lora`` on each backend."""
    from alter_kernels import gated_asym_lora

    def build(variant, device):
        x = torch.randn(T, k, device=device).to(dtype)
        stacked = (torch.randn(N + r, k, device=device) * 0.05).to(dtype)
        expand = (torch.randn(N * r, d, device=device) * 0.05).to(dtype)
        u = torch.randn(N, device=device)
        entropy = torch.rand(T, device=device) * 3
        out = torch.zeros(T, d, device=device, dtype=dtype)

        def step():
            with torch.no_grad():
                gated_asym_lora(out, x, stacked, u, entropy, expand, N, threshold=DEFAULTS.entropy_threshold,
                                tau_high=DEFAULTS.tau_high, tau_low=DEFAULTS.tau_low, k_high=DEFAULTS.k_high,
                                k_low=DEFAULTS.k_low, backend=variant, check_inputs=False)

        return step

    elem = torch.finfo(dtype).bits // 8
    return BenchCase(f"gated_asym_lora (decode) T={T} {k}->{d} r={r} N={N} {_dtype_name(dtype)}", "gated_asym_lora",
                     variants, build, bytes_moved=((N + r) * k + N * r * d + 2 * T * d) * elem, tokens=T)


def _route_case(T: int, N: int, variants) -> BenchCase:
    from alter_kernels import route

    def build(variant, device):
        router_logits = torch.randn(T, N, device=device).requires_grad_(True)
        entropy = torch.rand(T, device=device) * 3
        grad = _upstream_gradient((T, max(DEFAULTS.k_high, DEFAULTS.k_low)), torch.float32, device)

        def step():
            weights, _ = route(
                router_logits, entropy, DEFAULTS.entropy_threshold, DEFAULTS.tau_high, DEFAULTS.tau_low,
                DEFAULTS.k_high, DEFAULTS.k_low, backend=variant, check_finite=False,  # as AsymLoRALinear calls it
            )
            weights.backward(grad)
            _drop_grads(router_logits)

        return step

    K = max(DEFAULTS.k_high, DEFAULTS.k_low)
    # fwd: read logits and entropy, write weights and experts; bwd: read the gradient,
    # weights, experts and entropy, write the logits' gradient (all 4-byte values)
    return BenchCase(f"route fwd+bwd T={T} N={N} top-{DEFAULTS.k_high}", "route", variants, build, tokens=T,
                     bytes_moved=4 * T * (N + 1 + 2 * K + 3 * K + 1 + N))


def _moe_align_case(T: int, K: int, N: int, block_m: int, variants) -> BenchCase:
    from alter_kernels import moe_align

    def build(variant, device):
        # K distinct experts per token
        experts = torch.rand(T, N, device=device).argsort(dim=1)[:, :K].to(torch.int32).contiguous()
        return lambda: moe_align(experts, N, block_m, backend=variant)

    # read the ids, write the sorted slot ids (each expert padded to a block at most) and block owners
    padded = T * K + N * (block_m - 1)
    return BenchCase(f"moe_align T={T} K={K} N={N} block={block_m}", "moe_align", variants, build,
                     bytes_moved=4 * (T * K + padded + padded // block_m))


def _asym_lora_case(label: str, T: int, k: int, d: int, r: int, N: int, K: int, dtype, variants) -> BenchCase:
    """Whole layer (frozen W0 x + routing + AsymLoRA delta), forward and backward.

    Variants: ``linear`` is the frozen nn.Linear alone (the floor), ``loop`` a naive
    per-expert Python loop over dense gates (what HydraLoRA-style code does), ``eager``
    the readable reference, ``eager_dense`` the best eager formulation, ``triton`` the
    kernels (its routing too; the other variants route on the eager path). ``eager`` and
    ``triton`` add the delta into the base output (``out=``), as ``AsymLoRALinear`` does.
    """
    from alter_kernels import asym_lora, route
    from alter_kernels.asym_lora import asym_lora_eager_dense

    def build(variant, device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(T, k, generator=gen).to(device, dtype).requires_grad_(True)
        w0 = (torch.randn(d, k, generator=gen) / k**0.5).to(device, dtype)
        A = (torch.randn(r, k, generator=gen) / k**0.5).to(device, dtype).requires_grad_(True)
        B = (torch.randn(N, d, r, generator=gen) * 0.01).to(device, dtype).requires_grad_(True)
        router_logits = torch.randn(T, N, generator=gen).to(device).requires_grad_(True)
        entropy = torch.rand(T, generator=gen).to(device) * 3
        grad = _upstream_gradient((T, d), dtype, device)
        scaling = 2.0
        route_backend = "triton" if variant == "triton" else "eager"

        def layer():
            base = F.linear(x, w0)
            if variant == "linear":
                return base
            weights, experts = route(
                router_logits, entropy, DEFAULTS.entropy_threshold, DEFAULTS.tau_high, DEFAULTS.tau_low, K, 1,
                backend=route_backend, check_finite=False,  # as AsymLoRALinear calls it: no host sync
            )
            if variant == "loop":
                return base + _naive_expert_loop(x, A, B, weights, experts, scaling)
            if variant == "eager_dense":
                return base + asym_lora_eager_dense(x, A, B, weights, experts, scaling)
            # as AsymLoRALinear calls it: the delta added into the base output in place
            return asym_lora(x, A, B, weights, experts, scaling, backend=variant, out=base)

        def step():
            layer().backward(grad)
            _drop_grads(x, A, B, router_logits)

        return step

    # The frozen matmul's floor: forward x W0^T, backward g W0 (W0 has no gradient); fwd
    # reads x and W0 and writes the output, bwd reads g and W0 and writes dx. The adapter
    # should add little to either.
    elem = torch.finfo(dtype).bits // 8
    return BenchCase(
        f"AsymLoRA layer fwd+bwd {label} T={T} {k}->{d} r={r} N={N} top-{K} {_dtype_name(dtype)}",
        "asym_lora", variants, build, flops=2 * T * k * d * 2, bytes_moved=elem * 2 * (T * k + d * k + T * d),
        tokens=T,
    )


def _naive_expert_loop(x, A, B, weights, experts, scaling):
    """HydraLoRA-style baseline: every expert runs on every token, gated densely."""
    gate = torch.zeros(x.shape[0], B.shape[0], device=x.device, dtype=torch.float32)
    gate = gate.scatter_add(1, experts.clamp(min=0).long(), weights * (experts >= 0))
    h = x @ A.t()
    out = 0
    for e in range(B.shape[0]):
        out = out + gate[:, e : e + 1].to(x.dtype) * (h @ B[e].t())
    return scaling * out


# ----------------------------------------------------------------------------------
# the device and the op cases
# ----------------------------------------------------------------------------------


def bench_device() -> torch.device:
    """``ALTER_BENCH_DEVICE`` if set, else CUDA when available, else the CPU."""
    return torch.device(os.environ.get("ALTER_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def op_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if device.type == "cuda":
        logits_variants = ("eager", "triton", "cpp")
        layer_variants = ("linear", "loop", "eager", "eager_dense", "triton")
        T, V = 16384, 128256
        return [
            _entropy_case(T, V, torch.bfloat16, False, logits_variants),
            _entropy_case(T, V, torch.bfloat16, True, logits_variants),
            _ihl_case(T, V, torch.bfloat16, logits_variants),
            # no eager variant: its float32 temporaries of [16384, 128256] take tens of GB
            _token_losses_case(T, V, torch.bfloat16, ("apart", "triton")),
            _fused_linear_entropy_case(T, 4096, V, torch.bfloat16, logits_variants),
            _route_case(8192, 8, ("eager", "triton")),
            _moe_align_case(8192, 3, 8, 64, ("eager", "cpp")),
            _asym_lora_case("MLP", 8192, 4096, 14336, 8, 8, 3, torch.bfloat16, layer_variants),
            _asym_lora_case("attention", 8192, 4096, 4096, 8, 8, 3, torch.bfloat16, layer_variants),
            _gated_asym_lora_case(4, 4096, 14336, 8, 8, torch.bfloat16, ("eager", "triton")),
        ]
    cpu = ("eager", "cpp")
    shapes = [(512, 32000), (128, 128256)] if quick else [(4096, 32000), (1024, 128256)]
    cases = []
    for T, V in shapes:
        cases += [
            _entropy_case(T, V, torch.float32, False, cpu),
            _entropy_case(T, V, torch.float32, True, cpu),
            _ihl_case(T, V, torch.float32, cpu),
        ]
    T, V = shapes[0]
    cases.append(_token_losses_case(T, V, torch.float32, ("eager", "apart", "cpp")))
    cases.append(_fused_linear_entropy_case(256 if quick else 1024, 256, 32000, torch.float32, cpu))
    cases.append(_gated_asym_lora_case(4, 1024, 2816, 8, 8, torch.float32, cpu))
    cases.append(_moe_align_case(1024 if quick else 8192, 3, 8, 16, cpu))
    T, k, d = (256, 256, 512) if quick else (1024, 1024, 2816)
    cases.append(_asym_lora_case("MLP-like", T, k, d, 8, 8, 3, torch.float32, ("linear", "loop", "eager", "eager_dense")))
    return cases

