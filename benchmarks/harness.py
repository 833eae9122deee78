"""Benchmark cases for every op and for whole ALTER steps, and the ``alter bench`` table.

The cases live here so that the pytest-benchmark suite (``benchmarks/``) and
``alter bench`` time the same thing. ``alter bench`` runs that suite with
``pytest --benchmark-json`` and turns its results into one table: for each case, each
variant's median time, peak memory, and both as ratios to the case's baseline (the eager
path, the frozen ``nn.Linear`` alone, or the unpatched model) measured in the same run.
Shapes depend on the device: CPU-sized on the CPU (``--quick`` shrinks them further for
CI), Llama-3-8B-sized on a GPU.

Peak memory is what one call needs above what existed before it (its inputs, the model,
the optimizer state), outputs and gradients included, measured after a warm-up call:

- CUDA: the caching allocator's peak statistics, in the benchmark process;
- CPU: the peak resident set size (``VmHWM``) of a fresh subprocess per case, reset with
  ``/proc/self/clear_refs`` just before the call. The subprocess sets
  ``MALLOC_MMAP_THRESHOLD_`` so that freed blocks go back to the OS instead of staying
  resident in the heap, where a later temporary would reuse them unseen; the timed
  process keeps glibc's defaults.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from alter.config import AlterConfig

Step = Callable[[], object]

# Groups of model-level cases (fewer rounds on a GPU; tokens per second in the table).
MODEL_GROUPS = ("train_step", "inference")
# The settings the ALTER defaults use, so that the op cases time what training runs.
DEFAULTS = AlterConfig()
# Variants that are not a backend name: each case's baselines and the dispatcher's choice.
NON_BACKEND_VARIANTS = ("linear", "loop", "eager_dense", "base", "kernels")
# Set by ``alter bench --budget``: the time (epoch seconds) after which no case starts.
DEADLINE_ENV = "ALTER_BENCH_DEADLINE"
# glibc serves allocations of at least this many bytes with mmap, returned on free
# (set in the CPU memory subprocess only).
MEMORY_CHILD_MMAP_THRESHOLD = 64 * 1024


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
# model-level cases
# ----------------------------------------------------------------------------------


def _model_config(device: torch.device, quick: bool):
    """(LlamaConfig, dtype, (batch, seq_len)): Llama-3-8B cut to two layers on a GPU,
    a tiny Llama on the CPU."""
    from transformers import LlamaConfig

    if device.type == "cuda":
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        ), torch.bfloat16, (4, 1024)
    return LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    ), torch.float32, ((2, 64) if quick else (4, 128))


def _bench_alter_config(variant: str, entropy_source: str) -> AlterConfig:
    """``eager`` puts every op of the layers and the prepass on the eager path;
    ``kernels`` lets the dispatcher pick the fastest backend of each op."""
    # high_entropy_weight: a random model's tokens are all high-entropy; a nonzero weight
    # keeps every forget token in the IHL, as the low-entropy tokens of real data are.
    return AlterConfig(
        r=8, num_experts=8, k_high=3, high_entropy_weight=0.1, entropy_source=entropy_source,
        backend="eager" if variant == "eager" else None,
    )


def _build_model(device, quick, variant, entropy_source="prepass"):
    """The model of :func:`_model_config`, built on ``device``; ``base`` leaves it
    unpatched, ``eager`` / ``kernels`` patch it (see :func:`_bench_alter_config`) with
    random experts B (their zero init would make every adapter output zero)."""
    from transformers import LlamaForCausalLM

    from alter.model import apply_alter

    config, dtype, (batch, seq) = _model_config(device, quick)
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: an 8B-shaped model on a GPU in ms
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    alter_config = None
    if variant != "base":
        alter_config = _bench_alter_config(variant, entropy_source)
        model = apply_alter(model, alter_config)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.01)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    return model, alter_config, input_ids


def _train_step_case(device: torch.device, quick: bool) -> BenchCase:
    """One ALTER step as ``alter.unlearn`` runs it, through the trainer's own setup and step
    function (so the case cannot drift from the trainer): the base-model pass caches the
    entropy, the model is patched, then each step is the objective's ``step`` (a forget and
    a retain pass under forced routes with β·IHL + γ·NLL + structural term, and the two
    router-only passes of the routing loss) and the optimizer step. Half the rows are
    forget samples (a random prompt, then an answer), half retain samples. As in the
    trainer, autocast on a GPU; gradient checkpointing stays off (the kernels are timed,
    not the recompute)."""
    from alter import methods, train
    from alter.data import IGNORE_INDEX
    from alter.methods.args import UnlearnArgs

    config, _, (batch, seq) = _model_config(device, quick)

    def build(variant, dev):
        model, _, _ = _build_model(dev, quick, "base")
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        prompt = seq // 4
        examples = [
            {"input_ids": row.tolist(), "attention_mask": [1] * seq,
             "labels": [IGNORE_INDEX] * prompt + row[prompt:].tolist()}
            for row in ids
        ]
        half = max(batch // 2, 1)
        forget, retain = examples[:half], examples[half:] or examples[:half]
        autocast = train._autocast_factory(dev, dev.type == "cuda")
        args = UnlearnArgs(method="alter", config=_bench_alter_config(variant, "prepass"), batch_size=half)
        objective = methods.build(args, autocast)
        optimizer, forget, retain = objective.setup(model, forget, retain, 0)
        forget_batch = train._batch(forget, range(len(forget)), 0, dev)
        retain_batch = train._batch(retain, range(len(retain)), 0, dev)
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            objective.step(model, forget_batch, retain_batch)
            optimizer.step()

        return step

    what = "Llama-3-8B x2 layers" if device.type == "cuda" else "tiny Llama"
    return BenchCase(f"ALTER train step {what} [{batch}x{seq}]", "train_step", ("eager", "kernels"), build,
                     tokens=batch * seq)


def _inference_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    """Prefill (entropy prepass + forward) and greedy decoding (entropy lagged by one
    token) of a patched model against the unpatched model (``base``, the baseline)."""
    _, _, (batch, seq) = _model_config(device, quick)
    prompt_len = min(16, seq)
    new_tokens = 8 if quick else 32

    def prefill(variant, dev):
        model, _, input_ids = _build_model(dev, quick, variant)
        model.eval()

        def step():
            with torch.no_grad():
                model(input_ids)

        return step

    def decode(variant, dev):
        model, _, input_ids = _build_model(dev, quick, variant, entropy_source="lagged")
        model.eval()
        prompt = input_ids[:, :prompt_len]

        def step():
            with torch.no_grad():
                model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id,
                )

        return step

    variants = ("base", "eager", "kernels")
    return [
        BenchCase(f"prefill [{batch}x{seq}]", "inference", variants, prefill, tokens=batch * seq),
        BenchCase(f"decode {new_tokens} tokens x{batch} (prompt {prompt_len})", "inference", variants, decode,
                  tokens=batch * new_tokens),
    ]


# ----------------------------------------------------------------------------------
# case lists
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
            _fused_linear_entropy_case(T, 4096, V, torch.bfloat16, logits_variants),
            _route_case(8192, 8, ("eager", "triton")),
            _moe_align_case(8192, 3, 8, 64, ("eager", "cpp")),
            _asym_lora_case("MLP", 8192, 4096, 14336, 8, 8, 3, torch.bfloat16, layer_variants),
            _asym_lora_case("attention", 8192, 4096, 4096, 8, 8, 3, torch.bfloat16, layer_variants),
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
    cases.append(_fused_linear_entropy_case(256 if quick else 1024, 256, 32000, torch.float32, cpu))
    cases.append(_moe_align_case(1024 if quick else 8192, 3, 8, 16, cpu))
    T, k, d = (256, 256, 512) if quick else (1024, 1024, 2816)
    cases.append(_asym_lora_case("MLP-like", T, k, d, 8, 8, 3, torch.float32, ("linear", "loop", "eager", "eager_dense")))
    return cases


def model_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    return [_train_step_case(device, quick), *_inference_cases(device, quick)]


def all_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    return op_cases(device, quick) + model_cases(device, quick)


def find_case(name: str, device: torch.device, quick: bool) -> BenchCase:
    for case in all_cases(device, quick):
        if case.name == name:
            return case
    raise KeyError(f"no benchmark case named {name!r}")


# ----------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------


def cuda_peak_memory_bytes(case: BenchCase, variant: str, device: torch.device) -> int:
    """Peak memory one warm call of ``variant`` allocates above what existed before it."""
    step = case.build(variant, device)
    step()  # warm-up: compiles kernels, creates optimizer state
    synchronize(device)
    gc.collect()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def cpu_peak_rss_supported() -> bool:
    """Whether this OS lets a process reset its peak RSS (Linux ``clear_refs``)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def cpu_peak_memory_bytes(case: BenchCase, quick: bool) -> dict[str, int | None]:
    """Peak RSS growth of one warm call of each variant of ``case``, measured in a fresh
    subprocess (see the module docstring); None for variants that cannot run or when
    the OS cannot reset the peak."""
    if not cpu_peak_rss_supported():
        return dict.fromkeys(case.variants)
    cmd = [sys.executable, "-m", "alter.bench", "_peak-rss", case.name] + (["--quick"] if quick else [])
    env = {**os.environ, "ALTER_BENCH_DEVICE": "cpu", "MALLOC_MMAP_THRESHOLD_": str(MEMORY_CHILD_MMAP_THRESHOLD)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the memory subprocess for {case.name!r} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def peak_rss_growth(step: Step) -> int:
    """Peak RSS growth of one warm call of ``step`` (Linux): warm up, reset the peak RSS
    to the current RSS, run once, and return peak - before."""
    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    before = _proc_status_bytes("VmRSS")
    step()
    return max(0, _proc_status_bytes("VmHWM") - before)


def _peak_rss_child(name: str, quick: bool) -> dict[str, int | None]:
    """In the memory subprocess: :func:`peak_rss_growth` of each variant of a case."""
    device = torch.device("cpu")
    case = find_case(name, device, quick)
    peaks: dict[str, int | None] = {}
    for variant in case.variants:
        if variant_unavailable(variant, device):
            peaks[variant] = None
            continue
        peaks[variant] = peak_rss_growth(case.build(variant, device))
        gc.collect()  # the variant's inputs are gone before the next one is built
    return peaks


# ----------------------------------------------------------------------------------
# ceilings (GPU roofline)
# ----------------------------------------------------------------------------------


def measure_ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s), measured now."""
    if device.type != "cuda":
        return {}
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_bandwidth": bandwidth, "bf16_matmul_flops": 2 * n**3 / (ms * 1e-3)}


# ----------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------


def summarize(results: list[dict], ceilings: dict) -> list[dict]:
    """Table rows, in the order of ``results``, with ratios to each case's baseline.

    results: one dict per (case, variant) with ``case``, ``variant``, ``variant_index``
    (0 = the baseline), ``median_s``, ``peak_bytes`` (or None) and optionally ``tokens``,
    ``bytes_moved``, ``flops``. Added: ``speedup`` = baseline median / median and
    ``memory_ratio`` = peak / baseline peak (None when the baseline was not run or has no
    peak), ``tokens_per_s``, and ``roofline`` when the ceilings are known: the roofline
    time of the op (its bytes over the copy bandwidth or its FLOPs over the matmul rate,
    whichever is longer) over the measured time.
    """
    baselines = {r["case"]: r for r in results if r["variant_index"] == 0}
    rows = []
    for r in results:
        row = dict(r)
        base = baselines.get(r["case"])
        row["speedup"] = base["median_s"] / r["median_s"] if base else None
        row["memory_ratio"] = (
            r["peak_bytes"] / base["peak_bytes"]
            if base and base["peak_bytes"] and r["peak_bytes"] is not None
            else None
        )
        row["tokens_per_s"] = r["tokens"] / r["median_s"] if r.get("tokens") else None
        bounds = []
        if r.get("bytes_moved") and ceilings.get("copy_bandwidth"):
            bounds.append(r["bytes_moved"] / ceilings["copy_bandwidth"])
        if r.get("flops") and ceilings.get("bf16_matmul_flops"):
            bounds.append(r["flops"] / ceilings["bf16_matmul_flops"])
        row["roofline"] = max(bounds) / r["median_s"] if bounds else None
        rows.append(row)
    return rows


def _mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:.1f}" if mib >= 0.1 or nbytes == 0 else "<0.1"


def _optional(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`summarize` as a text table, one block per case."""
    columns = ["variant", "median ms", "peak MiB", "speedup", "mem ratio", "tok/s", "roofline"]
    cells = []
    for r in rows:
        cells.append([
            r["variant"],
            f"{1e3 * r['median_s']:.3f}",
            _mib(r["peak_bytes"]),
            _optional(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            _optional(r["memory_ratio"], ".2f"),
            _optional(r["tokens_per_s"], ".0f"),
            "-" if r["roofline"] is None else f"{100 * r['roofline']:.0f}%",
        ])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    header = line(columns)
    lines = []
    previous = None
    for r, row in zip(rows, cells):
        if r["case"] != previous:
            lines += ["", r["case"], header, "-" * len(header)]
            previous = r["case"]
        lines.append(line(row))
    lines += [
        "",
        "speedup = baseline median / variant median; mem ratio = variant peak / baseline peak, in the same run.",
        "baseline = the first variant of each case: eager (ops, train step), linear (the frozen nn.Linear alone, "
        "AsymLoRA layer) or base (the unpatched model, inference).",
        "peak = memory one warm call needs above what existed before it, outputs and gradients included "
        "(a fwd+bwd of [T, V] logits writes a [T, V] gradient).",
        "kernels = the backend the dispatcher picks for each op on this device; roofline = the op's roofline "
        "time (its bytes over the measured copy bandwidth or its FLOPs over the measured bf16 matmul rate, "
        "whichever is longer) over its median; for the AsymLoRA layer, the frozen matmul's alone.",
    ]
    return "\n".join(lines[1:])


def plot(rows: list[dict], path: Path) -> bool:
    """Bar chart of every row's speedup over its case's baseline; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"] is not None]
    labels = [f"{r['case'][:64]} :: {r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, max(3, 0.28 * len(rows))))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows],
            color=["tab:gray" if r["variant_index"] == 0 else "tab:blue" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the case's baseline (gray), same run; log scale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def benchmarks_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (path / "test_bench.py").exists():
        raise FileNotFoundError(f"the benchmark suite is not at {path}: run `alter bench` from a source checkout")
    return path


def _run_description(data: dict, device: torch.device, ceilings: dict, quick: bool) -> dict:
    """Where and when the results were measured, for the table header and results.json."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = data.get("machine_info", {}).get("cpu", {})
        machine = (f"{cpu.get('brand_raw', 'cpu')}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"load average {os.getloadavg()[0]:.1f} at the end")
    commit = data.get("commit_info", {})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "machine": machine,
        "torch": torch.__version__,
        "commit": (commit.get("id") or "unknown") + (" (dirty)" if commit.get("dirty") else ""),
        "sizes": "quick" if quick else "full",
        "ceilings": ceilings,
    }


def _header(info: dict) -> str:
    text = (f"{info['date']}  device: {info['device']} ({info['machine']})  torch {info['torch']}  "
            f"commit {info['commit']}  sizes: {info['sizes']}")
    ceilings = info["ceilings"]
    if ceilings:
        text += (f"\nceilings: copy {ceilings['copy_bandwidth'] / 1e9:.0f} GB/s, "
                 f"bf16 matmul {ceilings['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alter bench",
        description="Time every ALTER op and model-level step against the eager path and print one table "
        "(runs the pytest-benchmark suite in benchmarks/).",
    )
    parser.add_argument("--out", default="bench_out", help="folder for results.json, table.txt and bench.png")
    parser.add_argument("--quick", action="store_true", help="CI sizes and few rounds (CPU)")
    parser.add_argument("-k", default=None, help="only cases matching this pytest -k expression")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no case after this many seconds; the table lists what was measured")
    args = parser.parse_args(argv)

    import pytest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "pytest-benchmark.json"
    raw.unlink(missing_ok=True)
    os.environ["ALTER_BENCH_QUICK"] = "1" if args.quick else "0"
    if args.budget is not None:
        os.environ[DEADLINE_ENV] = str(time.time() + args.budget)
    pytest_args = [str(benchmarks_dir()), "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}"]
    if args.k:
        pytest_args += ["-k", args.k]
    code = int(pytest.main(pytest_args))
    if code != 0:
        print(f"alter bench: the benchmark suite did not complete (pytest exit {code})", file=sys.stderr)
    if not raw.exists():
        return code or 1
    # An interrupted or partly failed run still writes what it measured.
    data = json.loads(raw.read_text())
    results = [{**b["extra_info"], "median_s": b["stats"]["median"]} for b in data["benchmarks"] if "case" in b["extra_info"]]
    ceilings = next((b["extra_info"]["ceilings"] for b in data["benchmarks"] if "ceilings" in b["extra_info"]), {})
    rows = summarize(results, ceilings)
    info = _run_description(data, bench_device(), ceilings, args.quick)
    problems = []
    if code != 0:
        problems.append(f"pytest exit {code}: only the cases that finished are listed")
    if args.budget is not None and time.time() > float(os.environ[DEADLINE_ENV]):
        problems.append(f"the time budget of {args.budget:.0f} s ran out: cases that had not started are missing")
    if problems:
        info["incomplete"] = "; ".join(problems)
    text = _header(info) + "".join(f"\nINCOMPLETE: {p}" for p in problems) + "\n\n" + format_table(rows)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({**info, "rows": rows}, indent=2))
    written = [out / "results.json", out / "table.txt"]
    if plot(rows, out / "bench.png"):
        written.append(out / "bench.png")
    else:
        print("alter bench: matplotlib is not installed; no bench.png", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    return code


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_peak-rss":
        print(json.dumps(_peak_rss_child(sys.argv[2], "--quick" in sys.argv[3:])))
    else:
        sys.exit(main())
