"""Benchmark cases for every op and for whole ALTER steps, and the ``alter bench`` table.

The cases live here so that the pytest-benchmark suite (``benchmarks/``) and
``alter bench`` time the same thing. ``alter bench`` runs that suite with
``pytest --benchmark-json`` and turns its results into one table: for each case, each
variant's median time, peak memory, and both as ratios to the eager path measured in
the same run. Shapes depend on the device: CPU-sized on the CPU (``--quick`` shrinks
them further for CI), Llama-3-8B-sized on a GPU.

Peak memory is the extra memory one call needs on top of its inputs: on CUDA from the
caching allocator's peak statistics; on the CPU from the peak resident set size of a
fresh subprocess that builds the inputs and runs the call once (``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

Step = Callable[[], object]


@dataclass
class BenchCase:
    """One benchmarked workload, run by several variants (the first is the baseline).

    ``build(variant, device)`` creates the inputs and returns a closure that runs one
    iteration. ``bytes_moved`` / ``flops`` (per iteration) give the roofline fraction on
    a GPU; ``tokens`` gives tokens per second for model-level cases.
    """

    name: str
    group: str
    variants: tuple[str, ...]
    build: Callable[[str, torch.device], Step]
    bytes_moved: float | None = None
    flops: float | None = None
    tokens: int | None = None
    notes: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(out) -> None:
    """Backward of a scalar made from an op's output (tuple outputs: the first)."""
    if isinstance(out, tuple):
        out = out[0]
    out.float().sum().backward()


# ----------------------------------------------------------------------------------
# op cases
# ----------------------------------------------------------------------------------


def _logits(T: int, V: int, dtype, device, requires_grad: bool) -> torch.Tensor:
    return (torch.randn(T, V, device=device, dtype=torch.float32) * 3).to(dtype).requires_grad_(requires_grad)


def _entropy_case(T: int, V: int, dtype, backward: bool, variants) -> BenchCase:
    from alter_kernels import tsallis_entropy

    def build(variant, device):
        logits = _logits(T, V, dtype, device, backward)

        def step():
            ent = tsallis_entropy(logits, 2.0, backend=variant)
            if backward:
                logits.grad = None
                _fwd_bwd(ent)

        return step

    elem = torch.finfo(dtype).bits // 8
    kind = "fwd+bwd" if backward else "fwd"
    # forward reads the logits once; backward reads them again and writes the gradient
    return BenchCase(
        f"tsallis_entropy {kind} [{T}x{V}] {str(dtype)[6:]}", "tsallis_entropy", variants, build,
        bytes_moved=T * V * elem * (3 if backward else 1),
    )


def _ihl_case(T: int, V: int, dtype, variants) -> BenchCase:
    from alter_kernels import inverted_hinge_loss

    def build(variant, device):
        logits = _logits(T, V, dtype, device, True)
        labels = torch.randint(0, V, (T,), device=device)
        labels[::7] = -100

        def step():
            logits.grad = None
            loss, _ = inverted_hinge_loss(logits, labels, 2.0, 1.2, high_entropy_weight=0.1, backend=variant)
            loss.backward()

        return step

    elem = torch.finfo(dtype).bits // 8
    return BenchCase(
        f"inverted_hinge_loss fwd+bwd [{T}x{V}] {str(dtype)[6:]}", "inverted_hinge_loss", variants, build,
        bytes_moved=T * V * elem * 3,
    )


def _moe_align_case(T: int, K: int, N: int, block_m: int, variants) -> BenchCase:
    from alter_kernels import moe_align

    def build(variant, device):
        experts = torch.stack([torch.randperm(N, device=device)[:K] for _ in range(T)]).to(torch.int32)
        return lambda: moe_align(experts, N, block_m, backend=variant)

    return BenchCase(f"moe_align T={T} K={K} N={N} block={block_m}", "moe_align", variants, build)


def _asym_lora_case(label: str, T: int, k: int, d: int, r: int, N: int, K: int, dtype, variants) -> BenchCase:
    """Whole layer (frozen W0 x + AsymLoRA delta) forward + backward.

    Variants: ``linear`` is the frozen nn.Linear alone (the floor), ``loop`` a naive
    per-expert Python loop (what HydraLoRA-style code does), ``eager`` the readable
    reference, ``eager_dense`` the best eager formulation, ``triton`` the kernels.
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
        scaling = 2.0

        def gated():
            return route(router_logits, entropy, 1.2, 0.8, 0.01, K, 1, backend="eager")

        def layer_loss():
            base = x @ w0.t()
            if variant == "linear":
                return base
            weights, experts = gated()
            if variant == "loop":
                delta = _naive_expert_loop(x, A, B, weights, experts, scaling)
            elif variant == "eager_dense":
                delta = asym_lora_eager_dense(x, A, B, weights, experts, scaling)
            else:
                delta = asym_lora(x, A, B, weights, experts, scaling, backend=variant)
            return base + delta

        def step():
            for p in (x, A, B, router_logits):
                p.grad = None
            layer_loss().float().sum().backward()

        return step

    flops = 2 * T * k * d * 3  # the frozen matmul forward + its two backward matmuls
    return BenchCase(
        f"AsymLoRA layer fwd+bwd {label} T={T} {k}->{d} r={r} N={N} top-{K} {str(dtype)[6:]}",
        "asym_lora", variants, build, flops=flops, tokens=T,
    )


def _naive_expert_loop(x, A, B, weights, experts, scaling):
    """HydraLoRA-style baseline: every expert runs on every token, gated densely."""
    gate = torch.zeros(x.shape[0], B.shape[0], device=x.device, dtype=torch.float32)
    gate.scatter_add_(1, experts.clamp(min=0).long(), weights * (experts >= 0))
    h = x @ A.t()
    out = 0
    for e in range(B.shape[0]):
        out = out + gate[:, e : e + 1].to(x.dtype) * (h @ B[e].t())
    return scaling * out


# ----------------------------------------------------------------------------------
# model-level cases
# ----------------------------------------------------------------------------------


def _model_config(device: torch.device, quick: bool):
    from transformers import LlamaConfig

    if device.type == "cuda":  # Llama-3-8B shapes, cut to two layers
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        ), torch.bfloat16, (4, 1024)
    size = (2, 64) if quick else (4, 128)
    return LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    ), torch.float32, size


def _patched_model(device, quick, variant, entropy_source="prepass"):
    """The model of :func:`_model_config`; ``base`` leaves it unpatched, ``eager`` patches
    it with every op on the eager path, ``kernels`` lets the dispatcher choose."""
    from transformers import LlamaForCausalLM

    from alter import AlterConfig, apply_alter

    config, dtype, (batch, seq) = _model_config(device, quick)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if variant != "base":
        backend = "eager" if variant == "eager" else None
        alter_config = AlterConfig(r=8, num_experts=8, k_high=3, backend=backend, entropy_source=entropy_source)
        model = apply_alter(model, alter_config)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    return model, input_ids, config, batch, seq


def _train_step_case(device: torch.device, quick: bool) -> BenchCase:
    """One ALTER step: prepass entropy, forward, IHL (forget half) + NLL (retain half),
    backward, optimizer step. ``eager`` forces every op onto the eager path; ``kernels``
    lets the dispatcher pick the fastest backend."""
    from alter.model import adapter_parameters, forced_route
    from alter_kernels import inverted_hinge_loss

    _, _, (batch, seq) = _model_config(device, quick)

    def build(variant, dev):
        backend = "eager" if variant == "eager" else None
        model, input_ids, config, batch, seq = _patched_model(dev, quick, variant)
        model.train()
        groups = adapter_parameters(model)
        opt = torch.optim.AdamW(
            [{"params": groups["A"], "lr": 1e-5}, {"params": groups["B"] + groups["router"], "lr": 1e-3}]
        )
        labels = input_ids[:, 1:].reshape(-1).clone()
        half = batch // 2 or 1
        forget_rows = torch.zeros(batch, seq - 1, dtype=torch.bool, device=dev)
        forget_rows[:half] = True
        forget_labels = torch.where(forget_rows.reshape(-1), labels, torch.full_like(labels, -100))
        retain_labels = torch.where(forget_rows.reshape(-1), torch.full_like(labels, -100), labels)
        experts = torch.tensor([1 + i % 7 if i < half else 0 for i in range(batch)], device=dev)

        def step():
            with forced_route(model, experts):
                logits = model(input_ids).logits[:, :-1].reshape(-1, config.vocab_size)
            ihl, _ = inverted_hinge_loss(logits, forget_labels, 2.0, 1.2, backend=backend)
            nll = torch.nn.functional.cross_entropy(logits.float(), retain_labels)
            (ihl + nll).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return BenchCase(
        f"ALTER train step Llama-{'3-8B x2 layers' if device.type == 'cuda' else 'tiny'} [{batch}x{seq}]",
        "train_step", ("eager", "kernels"), build, tokens=batch * seq,
    )


def _inference_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    """Prefill and decode of a patched model (router gating by entropy) against the
    unpatched model (variant ``base``, the baseline of these rows)."""
    _, _, (batch, seq) = _model_config(device, quick)
    new_tokens = 4 if quick else 16

    def prefill(variant, dev):
        model, input_ids, *_ = _patched_model(dev, quick, variant)
        model.eval()

        def step():
            with torch.no_grad():
                model(input_ids)

        return step

    def decode(variant, dev):
        model, input_ids, *_ = _patched_model(dev, quick, variant, entropy_source="lagged")
        model.eval()
        prompt = input_ids[:, : min(32, seq)]

        def step():
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        return step

    return [
        BenchCase(f"prefill [{batch}x{seq}]", "inference", ("base", "eager", "kernels"), prefill, tokens=batch * seq),
        BenchCase(f"decode {new_tokens} tokens x{batch}", "inference", ("base", "eager", "kernels"), decode,
                  tokens=batch * new_tokens),
    ]


# ----------------------------------------------------------------------------------
# case lists
# ----------------------------------------------------------------------------------


def bench_device() -> torch.device:
    return torch.device(os.environ.get("ALTER_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def op_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if device.type == "cuda":
        fast = ("eager", "triton")
        return [
            _entropy_case(16384, 128256, torch.bfloat16, False, fast),
            _entropy_case(16384, 128256, torch.bfloat16, True, fast),
            _ihl_case(16384, 128256, torch.bfloat16, fast),
            _moe_align_case(8192, 3, 8, 64, ("eager", "cpp")),
            _asym_lora_case("MLP", 8192, 4096, 14336, 8, 8, 3, torch.bfloat16,
                            ("linear", "loop", "eager", "eager_dense", "triton")),
            _asym_lora_case("attention", 8192, 4096, 4096, 8, 8, 3, torch.bfloat16,
                            ("linear", "loop", "eager", "eager_dense", "triton")),
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
    T = 1024 if quick else 8192
    cases.append(_moe_align_case(T, 3, 8, 16, cpu))
    T, k, d = (256, 256, 512) if quick else (1024, 1024, 2816)
    cases.append(_asym_lora_case("MLP-like", T, k, d, 8, 8, 3, torch.float32,
                                 ("linear", "loop", "eager", "eager_dense")))
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


def peak_memory_bytes(case: BenchCase, variant: str, device: torch.device, quick: bool) -> int:
    """Extra memory one call of ``variant`` needs beyond its inputs (after a warm-up call)."""
    if device.type == "cuda":
        step = case.build(variant, device)
        step()  # warm-up: compiles kernels, creates optimizer state
        _sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    cmd = [sys.executable, "-m", "alter.bench", "_peak-rss", case.name, variant] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "ALTER_BENCH_DEVICE": "cpu"})
    return int(out.stdout.strip().splitlines()[-1])


def _peak_rss_child(name: str, variant: str, quick: bool) -> int:
    """Runs in a fresh process: peak RSS growth of one call, after the inputs exist.

    The first call is not warmed up on purpose: ru_maxrss only grows, so a warm-up
    would hide the call's temporaries. Imports and the extension load happen first.
    """
    from alter_kernels._dispatch import cpp_extension

    cpp_extension()
    device = torch.device("cpu")
    step = find_case(name, device, quick).build(variant, device)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024  # Linux reports kB


# ----------------------------------------------------------------------------------
# ceilings (GPU roofline)
# ----------------------------------------------------------------------------------


def measure_ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s), measured now."""
    if device.type != "cuda":
        return {}
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return {"copy_bandwidth": bandwidth, "bf16_matmul_flops": 2 * 8192**3 / (ms * 1e-3)}


# ----------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------


def summarize(results: list[dict], ceilings: dict) -> list[dict]:
    """Rows with ratios against each case's baseline (its first variant) in this run."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["variant"]] = r
    rows = []
    for case_name, variants in by_case.items():
        baseline = next(iter(sorted(variants.values(), key=lambda r: r["variant_index"])))
        for r in sorted(variants.values(), key=lambda r: r["variant_index"]):
            row = dict(r)
            row["speedup"] = baseline["median_s"] / r["median_s"]
            if baseline["peak_bytes"] and r["peak_bytes"] is not None:
                row["memory_ratio"] = r["peak_bytes"] / baseline["peak_bytes"]
            else:
                row["memory_ratio"] = None
            if r.get("tokens"):
                row["tokens_per_s"] = r["tokens"] / r["median_s"]
            if r.get("bytes_moved") and ceilings.get("copy_bandwidth"):
                row["roofline"] = r["bytes_moved"] / r["median_s"] / ceilings["copy_bandwidth"]
            elif r.get("flops") and ceilings.get("bf16_matmul_flops"):
                row["roofline"] = r["flops"] / r["median_s"] / ceilings["bf16_matmul_flops"]
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'case':<62} {'variant':<12} {'median ms':>10} {'peak MiB':>9} {'speedup':>8} {'mem ratio':>9} {'tok/s':>10} {'roofline':>8}"
    lines = [header, "-" * len(header)]
    previous = None
    for r in rows:
        name = r["case"] if r["case"] != previous else ""
        previous = r["case"]
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        tok = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        roof = f"{100 * r['roofline']:.0f}%" if r.get("roofline") else "-"
        lines.append(
            f"{name[:62]:<62} {r['variant']:<12} {1e3 * r['median_s']:>10.3f} {peak:>9} "
            f"{r['speedup']:>7.2f}x {mem:>9} {tok:>10} {roof:>8}"
        )
    lines.append("speedup = baseline median / variant median; mem ratio = variant peak / baseline peak; "
                 "baseline = first variant of each case (eager, linear or base).")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case'][:40]}\n{r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.35 * len(rows))))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the case's baseline (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def benchmarks_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (path / "test_bench.py").exists():
        raise FileNotFoundError(f"the benchmark suite is not at {path}: run `alter bench` from a source checkout")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alter bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out", help="folder for results.json, table.txt and bench.png")
    parser.add_argument("--quick", action="store_true", help="CI sizes and few rounds (CPU)")
    parser.add_argument("-k", default=None, help="only cases matching this pytest -k expression")
    args = parser.parse_args(argv)

    import pytest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "pytest-benchmark.json"
    env_quick = "1" if args.quick else "0"
    os.environ["ALTER_BENCH_QUICK"] = env_quick
    pytest_args = [str(benchmarks_dir()), "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}"]
    if args.k:
        pytest_args += ["-k", args.k]
    code = pytest.main(pytest_args)
    if code != 0:
        print(f"alter bench: the benchmark suite failed (pytest exit {code})", file=sys.stderr)
        return int(code)
    data = json.loads(raw.read_text())
    results = [
        {**b["extra_info"], "median_s": b["stats"]["median"]}
        for b in data["benchmarks"]
        if "case" in b.get("extra_info", {})
    ]
    ceilings = next((b["extra_info"]["ceilings"] for b in data["benchmarks"] if "ceilings" in b.get("extra_info", {})), {})
    rows = summarize(results, ceilings)
    table = format_table(rows)
    machine = data.get("machine_info", {})
    header = (f"device: {bench_device()} ({torch.cuda.get_device_name() if torch.cuda.is_available() else machine.get('cpu', {}).get('brand_raw', 'cpu')}), "
              f"torch {torch.__version__}")
    if ceilings:
        header += (f"\nceilings: copy {ceilings['copy_bandwidth'] / 1e9:.0f} GB/s, "
                   f"bf16 matmul {ceilings['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    print(header)
    print(table)
    (out / "table.txt").write_text(header + "\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"device": str(bench_device()), "ceilings": ceilings, "rows": rows}, indent=2))
    plot(rows, out / "bench.png")
    print(f"wrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_peak-rss":
        print(_peak_rss_child(sys.argv[2], sys.argv[3], "--quick" in sys.argv[4:]))
    else:
        sys.exit(main())
