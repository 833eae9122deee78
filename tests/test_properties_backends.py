"""Property-based checks (hypothesis): every available backend against the float64
references of tests/_reference.py, over random shapes (mostly not powers of two),
fp32/fp16/bf16, row layouts (contiguous, rows of a wider buffer, column-major), -inf
entries and extreme but valid values (logits offset by up to ±1e4, spreads up to 30).

The examples are derandomized (the same ones on every run, so CI is reproducible) and few
per test, so the whole file stays well under a minute on one core; no example database is
written. Each example runs every backend that is available here (eager, cpp, the Triton
interpreter), so an unavailable one narrows the comparison instead of skipping it.

Tolerances (the references read the same rounded inputs as the kernels):
- entropy: float32 accumulation, rtol 2e-5 / atol 2e-6 (as tests/test_entropy.py);
- gradients of the logits: relative to the row's largest subtracted term (where float32
  cancellation happens: ``entropy_grad_term_scale``, plus |g|·max p for Shannon, whose eager
  autograd cancels p·1 terms; for the IHL |dL/dL_t|·max(p_y, p_v*)),
  1e-5 in float32 (the backwards rebuild p = exp((z - m) - log s) exactly at any offset),
  two ulps of fp16/bf16 storage, plus the dtype's smallest subnormal (rows whose
  gradient underflows the storage format);
- IHL loss 1e-5 / 2e-6 (as tests/test_ihl.py);
- route: experts exactly (selection in fp32 on fp32-exact values), weights atol 1e-5 /
  rtol 1e-4 (the exponent (l - l_max)/tau carries fp32 ulps), gradients 1e-5 relative to
  the largest entry plus one ulp of the stored dtype;
- moe_align: exactly.
"""
import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alter_kernels import inverted_hinge_loss, moe_align, route, tsallis_entropy
from alter_kernels._dispatch import unavailable_reason
from _reference import (
    IGNORE_INDEX,
    assert_close,
    entropy_grad_term_scale,
    is_shannon,
    log_softmax64,
    reduce_reference,
    reference_entropy,
    reference_entropy_grad,
    reference_ihl,
    reference_moe_align,
    reference_route,
    reference_route_grad,
    threshold_between,
)
from conftest import test_devices as devices_under_test  # renamed: pytest would collect test_*

DEVICE = devices_under_test()[0]


def available(backends):
    return [b for b in backends if unavailable_reason(b, torch.device(DEVICE)) is None]


LOGITS_BACKENDS = available(["eager", "cpp", "triton"])
ROUTE_BACKENDS = available(["eager", "triton"])
MOE_ALIGN_BACKENDS = available(["eager", "cpp"])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}
STORED_ULP = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def assert_grad_close(grad, expected, term_scale, what):
    """|grad - expected| <= GRAD_TOL · term_scale (per row) + the smallest subnormal of grad's dtype."""
    floor = torch.finfo(grad.dtype).smallest_normal * torch.finfo(grad.dtype).eps
    bound = GRAD_TOL[grad.dtype] * term_scale + floor
    error = (grad.detach().double().cpu() - expected).abs()
    assert bool(torch.isfinite(error).all()), f"{what}: non-finite gradient {grad}"
    worst = int((error - bound).flatten().argmax())
    assert bool((error <= bound).all()), (
        f"{what}: error {error.flatten()[worst]:.3g} > bound {bound.expand_as(error).flatten()[worst]:.3g} "
        f"at flat index {worst}; got {grad.flatten()[worst]}, expected {expected.flatten()[worst]}"
    )


def bounded(max_examples: int):
    """Few, derandomized examples, no deadline (the Triton interpreter is slow to start)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


class Case(NamedTuple):
    values: torch.Tensor  # [T, V] on the CPU, rounded to the dtype: what the references read
    layout: str
    generator: torch.Generator  # for the rest of the example's random inputs

    def on_device(self) -> torch.Tensor:
        """The same values on the device, in the drawn memory layout."""
        values = self.values.to(DEVICE)
        if self.layout == "row_stride":  # rows of a wider buffer
            wide = torch.zeros(values.shape[0], values.shape[1] + 3, dtype=values.dtype, device=DEVICE)
            wide[:, 1:-2] = values
            return wide[:, 1:-2]
        if self.layout == "column_major":
            return values.t().contiguous().t()
        return values


@st.composite
def matrices(draw, max_rows: int, max_cols: int, dtypes=DTYPES, min_cols: int = 1):
    """A [T, N] float matrix: randn · spread + offset, rounded to the dtype, with a random
    share of -inf entries (never a whole row), in a random memory layout."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(min_cols, max_cols))
    dtype = draw(st.sampled_from(dtypes))
    spread = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    offset = draw(st.one_of(st.just(0.0), st.sampled_from([1e4, -1e4]), st.floats(-1e4, 1e4)))
    masked = draw(st.sampled_from([0.0, 0.3, 0.9]))
    layout = draw(st.sampled_from(["contiguous", "row_stride", "column_major"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    values = torch.randn(rows, cols, dtype=torch.float64, generator=generator) * spread + offset
    mask = torch.rand(rows, cols, generator=generator) < masked
    mask[torch.arange(rows), torch.randint(cols, (rows,), generator=generator)] = False
    values = values.masked_fill(mask, -math.inf).to(dtype)
    return Case(values, layout, generator)


@bounded(max_examples=80)
@given(case=matrices(max_rows=7, max_cols=90), q=st.sampled_from([0.5, 1.0, 2.0, 3.5]))
def test_tsallis_entropy_backends_match_float64(case, q):
    values, dtype = case.values, case.values.dtype
    grad_out = torch.randn(values.shape[0], dtype=torch.float64, generator=case.generator)
    expected = reference_entropy(values, q)
    term_scale = entropy_grad_term_scale(values, q, grad_out)
    if is_shannon(q):  # the eager path's autograd of -Σ p log p also cancels p·1 terms
        term_scale = term_scale + grad_out.abs()[:, None] * log_softmax64(values).exp().amax(-1, keepdim=True)
    expected_grad = reference_entropy_grad(values, q, grad_out)
    for backend in LOGITS_BACKENDS:
        logits = case.on_device().requires_grad_()
        entropy = tsallis_entropy(logits, q, backend=backend)
        (grad,) = torch.autograd.grad(entropy, logits, grad_out.to(DEVICE))
        assert_close(entropy, expected, 2e-5, 2e-6, f"{backend} entropy")
        assert grad.dtype == dtype
        assert_grad_close(grad, expected_grad, term_scale, f"{backend} entropy grad")


@bounded(max_examples=80)
@given(
    case=matrices(max_rows=8, max_cols=90),
    q=st.sampled_from([0.5, 1.0, 2.0]),
    ignored=st.sampled_from([0.0, 0.3, 1.0]),
    split=st.booleans(),
    high_entropy_weight=st.sampled_from([0.0, 0.3]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_inverted_hinge_loss_backends_match_float64(case, q, ignored, split, high_entropy_weight, reduction):
    values, dtype = case.values, case.values.dtype
    rows, vocab = values.shape
    labels = torch.randint(vocab, (rows,), generator=case.generator)
    is_ignored = torch.rand(rows, generator=case.generator) < ignored
    labels[is_ignored] = IGNORE_INDEX
    # split: a threshold in the widest gap of the entropies (both weights occur when it can),
    # else every token low-entropy
    threshold = math.inf
    if split and not bool(is_ignored.all()):
        threshold = threshold_between(reference_entropy(values, q), is_ignored)
    ref = reference_ihl(values, labels, q, threshold, high_entropy_weight)
    expected_loss, dloss = reduce_reference(ref.loss, ref.weight, reduction)
    expected_grad = dloss[:, None] * ref.grad
    p = log_softmax64(values).exp()
    p_target = p.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    p_runner_up = torch.where(ref.runner_up >= 0, p.gather(1, ref.runner_up.clamp_min(0)[:, None])[:, 0], 0.0)
    term_scale = (dloss.abs() * torch.maximum(p_target, p_runner_up))[:, None]
    for backend in LOGITS_BACKENDS:
        logits = case.on_device().requires_grad_()
        loss, entropy = inverted_hinge_loss(
            logits, labels.to(DEVICE), q, threshold, high_entropy_weight, reduction=reduction, backend=backend
        )
        (grad,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
        assert_close(loss, expected_loss, 1e-5, 2e-6, f"{backend} {reduction} IHL")
        assert_close(entropy, ref.entropy, 2e-5, 2e-6, f"{backend} IHL entropy")
        assert grad.dtype == dtype
        assert_grad_close(grad, expected_grad, term_scale, f"{backend} IHL grad")


@st.composite
def route_cases(draw):
    case = draw(matrices(max_rows=12, max_cols=20))
    num_experts = case.values.shape[1]
    k_high = draw(st.integers(1, min(num_experts, 4)))
    k_low = draw(st.integers(1, k_high))
    tau_low = draw(st.sampled_from([0.01, 0.3]))
    return case, k_high, k_low, tau_low


@bounded(max_examples=80)
@given(args=route_cases())
def test_route_backends_match_float64(args):
    case, k_high, k_low, tau_low = args
    values, dtype = case.values, case.values.dtype
    threshold, tau_high = 1.25, 0.8
    rows, num_experts = values.shape
    entropy = torch.rand(rows, generator=case.generator) * 2 * threshold
    entropy[::3] = threshold  # exactly at it: low entropy
    grad_weights = torch.randn(rows, max(k_high, k_low), dtype=torch.float64, generator=case.generator)
    ref_w, ref_e = reference_route(values, entropy, threshold, tau_high, tau_low, k_high, k_low)
    ref_grad = reference_route_grad(ref_w, ref_e, entropy, threshold, tau_high, tau_low, grad_weights, num_experts)
    grad_scale = ref_grad.abs().max().clamp_min(1.0)
    for backend in ROUTE_BACKENDS:
        logits = case.on_device().requires_grad_()
        weights, experts = route(
            logits, entropy.to(DEVICE), threshold, tau_high, tau_low, k_high, k_low, backend=backend
        )
        assert torch.equal(experts.cpu().long(), ref_e), f"{backend} experts"
        torch.testing.assert_close(weights.detach().cpu().double(), ref_w, atol=1e-5, rtol=1e-4)
        (grad,) = torch.autograd.grad(weights, logits, grad_weights.to(device=DEVICE, dtype=torch.float32))
        assert grad.dtype == dtype
        tol = 1e-5 + STORED_ULP[dtype]
        assert_close(grad.cpu() / grad_scale, ref_grad / grad_scale, 0, tol, f"{backend} route grad")


@bounded(max_examples=80)
@given(
    rows=st.integers(0, 40),
    slots=st.integers(1, 4),
    num_experts=st.integers(1, 10),
    block_m=st.sampled_from([1, 2, 3, 16, 64]),
    unused=st.sampled_from([0.0, 0.4, 1.0]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_moe_align_backends_match_reference(rows, slots, num_experts, block_m, unused, transposed, seed):
    generator = torch.Generator().manual_seed(seed)
    experts = torch.randint(num_experts, (rows, slots), generator=generator, dtype=torch.int32)
    experts[torch.rand(rows, slots, generator=generator) < unused] = -1
    if transposed:  # a non-contiguous [T, K] view
        experts = experts.t().contiguous().t()
    ref_ids, ref_blocks, ref_padded = reference_moe_align(experts, num_experts, block_m)
    for backend in MOE_ALIGN_BACKENDS:
        sorted_ids, block_expert, num_padded = moe_align(experts.to(DEVICE), num_experts, block_m, backend=backend)
        assert sorted_ids.cpu().tolist() == ref_ids, backend
        assert block_expert.cpu().tolist() == ref_blocks, backend
        assert num_padded.cpu().tolist() == [ref_padded], backend
