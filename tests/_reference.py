"""Float64 references of the ops, written from the formulas of DESIGN.md §1, and helpers
shared by the kernel tests (test_entropy.py, test_ihl.py, test_routing.py,
test_cpp_extension.py, test_properties_backends.py).

The references are plain float64 PyTorch on the CPU, independent of alter_kernels: they
take the same (already rounded) logits the kernels read, on any device, and return CPU
float64 tensors. They stay differentiable in the logits, so a test can check a closed-form
gradient against autograd of the value.
"""
import itertools
import math
from typing import NamedTuple

import pytest
import torch

from alter_kernels._dispatch import KernelPair

IGNORE_INDEX = -100


def is_shannon(q: float) -> bool:
    """|q - 1| < 1e-3 is Shannon entropy (the Tsallis formula cancels there)."""
    return abs(q - 1.0) < 1e-3


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    """log p, p = softmax(logits) over the last dim, in float64 on the CPU (-inf where a logit is -inf)."""
    z = logits.double().cpu()
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def reference_max_and_log_sum(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, log Σ_i e^{z_i - m}) per row, float64 on the CPU: the row statistics the kernel
    forwards save for their backward."""
    z = logits.double().cpu()
    row_max = z.amax(dim=-1)
    return row_max, torch.logsumexp(z - row_max[..., None], dim=-1)


def reference_entropy(logits: torch.Tensor, q: float) -> torch.Tensor:
    """Entropy per row [...]: Tsallis S_q = (1 - Σ p^q)/(q - 1), Shannon H = -Σ p log p
    (0 log 0 = 0) when |q - 1| < 1e-3."""
    log_p = log_softmax64(logits)
    p = log_p.exp()
    if is_shannon(q):
        return -torch.where(p > 0, p * log_p, 0.0).sum(-1)
    return (1.0 - (p**q).sum(-1)) / (q - 1.0)


def reference_entropy_grad(logits: torch.Tensor, q: float, grad_entropy: torch.Tensor) -> torch.Tensor:
    """grad_entropy · dS/dz [..., V] from the closed forms: dS_q/dz_j = -q/(q-1)(p_j^q - p_j Σp^q),
    dH/dz_j = -p_j (log p_j + H)."""
    log_p = log_softmax64(logits)
    p = log_p.exp()
    if is_shannon(q):
        entropy = reference_entropy(logits, q)[..., None]
        grad = -torch.where(p > 0, p * (log_p + entropy), 0.0)
    else:
        p_q = p**q
        grad = -q / (q - 1.0) * (p_q - p * p_q.sum(-1, keepdim=True))
    return grad_entropy.double().cpu()[..., None] * grad


def entropy_grad_term_scale(logits, q, grad_entropy):
    """Per row [T, 1], the largest magnitude of the terms that the gradient formulas subtract:
    |g|·q/|q-1|·(p^q + p·Σp^q), Shannon |g|·p·(|log p| + H)."""
    p = log_softmax64(logits).exp()
    if is_shannon(q):
        log_p = torch.where(p > 0, torch.log(p), torch.zeros_like(p))
        terms = p * (log_p.abs() + reference_entropy(logits, q)[..., None])
    else:
        terms = q / abs(q - 1.0) * (p**q + p * (p**q).sum(-1, keepdim=True))
    return grad_entropy.double().cpu().abs()[..., None] * terms.amax(dim=-1, keepdim=True)


class IHLReference(NamedTuple):
    """Per token of the inverted hinge loss, float64 on the CPU."""

    loss: torch.Tensor  # [T] unweighted 1 + p_y - p_v*, 0 for ignored tokens
    entropy: torch.Tensor  # [T]
    weight: torch.Tensor  # [T] 0 ignored, 1 if entropy <= threshold, else high_entropy_weight
    grad: torch.Tensor  # [T, V] d loss_t / d z_t, 0 for ignored tokens
    runner_up: torch.Tensor  # [T] int64 v*: the first maximum of the other finite logits, -1 if none


def reference_ihl(logits, labels, q, threshold, high_entropy_weight, ignore_index=IGNORE_INDEX) -> IHLReference:
    """The IHL of DESIGN.md §1 token by token: L = 1 + p_y - max_{v≠y} p_v (the max over no
    other word is 0), dL/dz_j = p_y(δ_jy - p_j) - p_v*(δ_jv* - p_j)."""
    z = logits.double().cpu()
    p = log_softmax64(z).exp()
    entropy = reference_entropy(z, q)
    T, V = z.shape
    loss = torch.zeros(T, dtype=torch.float64)
    weight = torch.zeros(T, dtype=torch.float64)
    grad = torch.zeros(T, V, dtype=torch.float64)
    runner_up = torch.full((T,), -1, dtype=torch.int64)
    for t, y in enumerate(labels.tolist()):
        if y == ignore_index:
            continue
        others = (z[t] != float("-inf")) & (torch.arange(V) != y)
        p_runner_up = 0.0
        if bool(others.any()):
            runner_up[t] = int(((z[t] == z[t][others].max()) & others).nonzero()[0])
            p_runner_up = p[t, runner_up[t]]
        loss[t] = 1.0 + p[t, y] - p_runner_up
        weight[t] = 1.0 if entropy[t] <= threshold else high_entropy_weight
        grad[t] = -p[t, y] * p[t] + p_runner_up * p[t]
        grad[t, y] += p[t, y]
        if runner_up[t] >= 0:
            grad[t, runner_up[t]] -= p_runner_up
    return IHLReference(loss, entropy, weight, grad, runner_up)


def reduce_reference(loss, weight, reduction):
    """Reduced float64 loss and d(reduced)/d(per-token loss) as a [T] vector (all-ones upstream)."""
    weighted = loss * weight
    if reduction == "none":
        return weighted, weight
    if reduction == "sum":
        return weighted.sum(), weight
    total = weight.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float64), torch.zeros_like(weight)
    return weighted.sum() / total, weight / total


def threshold_between(entropy, ignored):
    """A threshold in the widest gap between the kept tokens' entropies, so float32 error
    cannot move a token across it and both weights occur."""
    values = sorted(entropy[~ignored].tolist())
    if values[-1] - values[0] < 1e-3:  # e.g. V == 1: every entropy is 0
        return values[-1] + 1.0
    gaps = [(values[i + 1] - values[i], i) for i in range(len(values) - 1)]
    gap, i = max(gaps)
    assert gap > 1e-3, f"entropies too close to split: {values}"
    return (values[i] + values[i + 1]) / 2


# ----------------------------------------------------------------------------- routing


def reference_route(logits, entropy, threshold, tau_high, tau_low, k_high, k_low):
    """Per-token float64 routing, straight from DESIGN.md §1: (weights [T, K] f64, experts [T, K] i64)."""
    num_tokens, num_experts = logits.shape
    num_slots = max(k_high, k_low)
    weights = torch.zeros(num_tokens, num_slots, dtype=torch.float64)
    experts = torch.full((num_tokens, num_slots), -1, dtype=torch.int64)
    for t in range(num_tokens):
        values = logits[t].double().tolist()
        high = float(entropy[t]) > threshold
        tau, k = (tau_high, k_high) if high else (tau_low, k_low)
        by_logit = sorted(range(num_experts), key=lambda e: (-values[e], e))
        chosen = [e for e in by_logit[:k] if values[e] != -math.inf]
        if not chosen:
            continue
        top = values[chosen[0]]
        exps = [math.exp((values[e] - top) / tau) for e in chosen]
        for j, e in enumerate(chosen):
            weights[t, j] = exps[j] / sum(exps)
            experts[t, j] = e
    return weights, experts


def reference_route_grad(weights, experts, entropy, threshold, tau_high, tau_low, grad_weights, num_experts):
    """d logit_e = w_e / tau · (g_e − Σ_k w_k g_k) for each kept expert e, in float64."""
    grad = torch.zeros(weights.shape[0], num_experts, dtype=torch.float64)
    for t in range(weights.shape[0]):
        tau = tau_high if float(entropy[t]) > threshold else tau_low
        w, g = weights[t].double(), grad_weights[t].double()
        dot = float((w * g).sum())
        for j, e in enumerate(experts[t].tolist()):
            if e >= 0:
                grad[t, e] += float(w[j]) / tau * (float(g[j]) - dot)
    return grad


def reference_moe_align(experts, num_experts, block_m):
    """Plain loop over experts and slots, from the contract in moe_align_eager's docstring."""
    flat = experts.flatten().tolist()
    numel = len(flat)
    ids, block_expert = [], []
    for e in range(num_experts):
        group = [i for i, x in enumerate(flat) if x == e]
        while len(group) % block_m:
            group.append(numel)
        ids += group
        block_expert += [e] * (len(group) // block_m)
    num_padded = len(ids)
    capacity = -(-(numel + num_experts * (block_m - 1)) // block_m)
    ids += [numel] * (capacity * block_m - num_padded)
    block_expert += [-1] * (capacity - len(block_expert))
    return ids, block_expert, num_padded


# ----------------------------------------------------------------------------- inputs, checks


def random_logits(rows, vocab, dtype, device, scale=3.0):
    """Fresh random logits, rounded to ``dtype``."""
    return (torch.randn(rows, vocab, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def strided_rows(logits):
    """The same values as a non-contiguous view: rows of a wider buffer (row stride > V)."""
    rows, vocab = logits.shape
    wide = torch.randn(rows, vocab + 5, device=logits.device).to(logits.dtype)
    wide[:, 2 : 2 + vocab] = logits
    view = wide[:, 2 : 2 + vocab]
    assert not view.is_contiguous() or rows == 1
    return view


def assert_close(actual, expected, rtol, atol, what):
    """Finite, same shape, and torch.testing.assert_close in float64 on the CPU."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def grid(**axes):
    """``pytest.mark.parametrize`` over every combination of the axes, e.g.
    ``grid(device=DEVICES, q=[0.5, 2.0])``; ids join str() of the values."""
    return pytest.mark.parametrize(", ".join(axes), list(itertools.product(*axes.values())), ids=str)


def forbid_host_reads(monkeypatch) -> None:
    """Make every way of reading a tensor's values on the host (bool(), .item(), int(),
    .tolist(), .nonzero(), ...) raise AssertionError for the rest of the test: on a GPU
    each is a sync that a CUDA-graph capture cannot contain."""
    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a host read of device values: Tensor.{name}")
        return read

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


def spy_on_kernels(monkeypatch, kernels: dict, backend: str) -> dict:
    """Wrap ``kernels[backend]`` (an op module's KernelPair) for the test: every call's
    arguments are recorded in the returned ``{"forward": [args, ...], "backward": [...]}``."""
    real = kernels[backend]
    calls = {"forward": [], "backward": []}

    def recorded(direction, kernel):
        def call(*args):
            calls[direction].append(args)
            return kernel(*args)

        return call

    monkeypatch.setitem(
        kernels, backend, KernelPair(recorded("forward", real.forward), recorded("backward", real.backward))
    )
    return calls


_HOPPER_COMPILE = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for spec in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = {name: getattr(tl, value[3:]) if isinstance(value, str) and value.startswith("tl.") else value
                  for name, value in spec["constexprs"].items()}
    signature = {name: "constexpr" if name in constexprs else spec["signature"].get(name, "i32")
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]})
    assert compiled.asm["cubin"], spec
    assert spec.get("ptx_contains", "") in compiled.asm["ptx"], spec
print("ok")
"""


def assert_compiles_for_hopper(specs: list[dict]) -> None:
    """Compile Triton kernels for sm_90 (PTX, then cubin by the ptxas that ships with
    triton), so that errors only a GPU build shows (layouts, shared memory, dot shapes) show
    on a CPU machine too. Each spec: module, kernel, signature (argument -> triton type;
    unlisted arguments are i32), constexprs (a string "tl.<name>" stands for that triton
    dtype), num_warps, and optionally ptx_contains (an instruction the PTX must use). Runs
    in a subprocess without TRITON_INTERPRET (which conftest sets for this process)."""
    import importlib.util
    import json
    import os
    import pathlib
    import subprocess
    import sys

    spec = importlib.util.find_spec("triton")
    if spec is None:
        pytest.skip("triton is not installed")
    if not (pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _HOPPER_COMPILE], input=json.dumps(specs), env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
