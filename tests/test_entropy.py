"""tsallis_entropy and fused_linear_entropy: every backend against the float64
formulas of tests/_reference.py.

Tolerances: backends accumulate in float32 on inputs that the references read exactly
(the references upcast the same rounded fp16/bf16 tensors), so values get float32
summation error only, relative ~1e-5 even over 128256 terms. Gradients stored in fp16/bf16
carry the rounding of the storage dtype (plus one bf16 ulp: the interpreter truncates).
"""
import math

import pytest
import torch

import alter_kernels.entropy as entropy_module
from alter_kernels import BackendUnavailable, fused_linear_entropy, inverted_hinge_loss, tsallis_entropy
from alter_kernels.entropy import DEFAULT_CHUNK_ELEMENTS, default_chunk_size
from _reference import (
    assert_close,
    assert_compiles_for_hopper,
    entropy_grad_term_scale,
    forbid_host_reads,
    grid,
    is_shannon,
    log_softmax64,
    random_logits,
    reference_entropy,
    reference_entropy_grad,
    spy_on_kernels,
    strided_rows,
)
from conftest import require_backend
from conftest import test_devices as devices_under_test  # renamed: pytest would collect test_*

DEVICES = devices_under_test()
BACKENDS = ["eager", "triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
Q_VALUES = [0.5, 1.0, 1.0005, 2.0, 3.5]
# Every device, backend, dtype, small vocabulary (one word, a few, ~1k) and q.
SMALL_VOCAB_GRID = grid(device=DEVICES, backend=BACKENDS, dtype=DTYPES, vocab=[1, 7, 1000], q=Q_VALUES)
# Tolerance of a gradient relative to its row's largest entry. fp16/bf16: two ulps of the
# storage format (rounding of the result, one more for interpreter truncation). float32:
# float32 arithmetic on exact row statistics (the forward saves m, log s and P_q).
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}


# ----------------------------------------------------------------------------- references


def test_reference_entropy_gradient_matches_autograd():
    """The closed-form gradient of the shared reference is the derivative of its entropy."""
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    for q in Q_VALUES:
        g = torch.randn(4, dtype=torch.float64)
        (auto,) = torch.autograd.grad(reference_entropy(z, q), z, g)
        torch.testing.assert_close(reference_entropy_grad(z.detach(), q, g), auto, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- values


@SMALL_VOCAB_GRID
def test_entropy_matches_float64(device, backend, dtype, vocab, q):
    require_backend(backend, device)
    logits = random_logits(5, vocab, dtype, device)
    logits[1, : vocab // 2] = float("-inf")  # masked vocabulary
    logits = strided_rows(logits)
    entropy = tsallis_entropy(logits, q, backend=backend)
    assert entropy.dtype == torch.float32
    # float32 accumulation; 1 - Σp^q cancels for q > 1 at entropies near 0 (atol).
    assert_close(entropy, reference_entropy(logits, q), rtol=2e-5, atol=2e-6, what=f"entropy q={q}")
    if vocab == 1:
        assert torch.equal(entropy.cpu(), torch.zeros(5)), "a one-word vocabulary has zero entropy"


# 8192: whole blocks of the triton kernel only (BLOCK_V 4096), no masked tail
@grid(device=DEVICES, backend=BACKENDS, dtype=[torch.float32, torch.bfloat16], vocab=[8192, 32003, 128256], q=[0.5, 1.0, 2.0])
def test_entropy_large_vocab(device, backend, dtype, vocab, q):
    require_backend(backend, device)
    logits = random_logits(3, vocab, dtype, device, scale=2.0)
    logits[0, vocab // 3 :] = float("-inf")
    logits[1, : vocab // 2] = float("-inf")  # leading blocks all masked
    entropy = tsallis_entropy(logits, q, backend=backend)
    # float32 sums over up to 128256 terms: relative error ~1e-5.
    assert_close(entropy, reference_entropy(logits, q), rtol=5e-5, atol=1e-5, what=f"entropy V={vocab} q={q}")


@grid(device=DEVICES, dtype=[torch.float32, torch.bfloat16], tokens=[1, 3], q=[0.5, 1.0, 2.0])
def test_entropy_split_v_small_T(device, dtype, tokens, q):
    """Below SPLIT_V_MAX_ROWS rows the triton forward splits each row over several programs
    and merges their (m, s, acc): V = 3·4096 + 77 gives 4 programs per row, the last with a
    masked tail. Rows: random; one whose first two programs see only -inf; 1e4 + O(1);
    a spike. Entropy and gradient (from the merged m, log s, P_q) match float64."""
    require_backend("triton", device)
    vocab = 3 * 4096 + 77
    assert entropy_module.split_v_splits(tokens, vocab) == 4
    assert entropy_module.split_v_splits(entropy_module.SPLIT_V_MAX_ROWS, vocab) == 1
    values = torch.randn(4, vocab, dtype=torch.float64) * 3
    values[1, :8192] = float("-inf")
    values[2] = values[2] / 1.5 + 1e4
    values[3, 5000] = 40.0
    logits = strided_rows(values[:tokens].to(device=device, dtype=dtype))
    leaf = logits.detach().requires_grad_()
    entropy = tsallis_entropy(leaf, q, backend="triton")
    reference = reference_entropy(logits, q)
    assert_close(entropy, reference, rtol=5e-5, atol=1e-5, what=f"split-V entropy T={tokens}")
    grad_out = torch.randn(tokens, dtype=torch.float64)
    (grad,) = torch.autograd.grad(entropy, leaf, grad_out.to(device))
    expected = reference_entropy_grad(logits, q, grad_out)
    scale = expected.abs().max()
    assert_close(grad.cpu() / scale, expected / scale, 0, GRAD_RTOL[dtype], "split-V grad")


@grid(device=DEVICES, backend=BACKENDS, dtype=DTYPES, q=[0.5, 1.0, 3.5])
def test_entropy_huge_logits(device, backend, dtype, q):
    """|z| ~ 1e4: no overflow; shifting all logits by 1e4 leaves the entropy unchanged."""
    require_backend(backend, device)
    big = 1e4
    logits = random_logits(4, 300, dtype, device, scale=big)
    logits[1] = (torch.randn(300, dtype=torch.float64) * 2 + big).to(dtype)  # 1e4 + O(1)
    logits[2] = (torch.randn(300, dtype=torch.float64) * 2 - big).to(dtype)
    leaf = logits.clone().requires_grad_()
    entropy = tsallis_entropy(leaf, q, backend=backend)
    # The O(1) spread survives rounding to dtype; error is float32 summation only.
    assert_close(entropy, reference_entropy(logits, q), rtol=2e-5, atol=2e-6, what="entropy of huge logits")
    grad_out = torch.randn(4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(entropy, leaf, grad_out.to(device))
    expected = reference_entropy_grad(logits, q, grad_out)
    # The backward rebuilds p = exp((z - m) - log s) with z - m exact: the magnitude of the
    # logits adds no error. Relative to the terms the gradient subtracts (which can cancel:
    # rows that rounding to fp16/bf16 made nearly uniform), storage rounding only.
    scale = entropy_grad_term_scale(logits, q, grad_out).clamp_min(1e-12)  # one-hot rows: all 0
    assert_close(grad / scale.to(device), expected / scale, rtol=0, atol=GRAD_RTOL[dtype], what="grad of huge logits")


@grid(device=DEVICES, backend=BACKENDS)
def test_entropy_known_values(device, backend):
    """Closed forms: uniform over n words (the rest -inf) and a one-hot row."""
    require_backend(backend, device)
    logits = torch.full((3, 50), float("-inf"), device=device)
    logits[0, 10:30] = 0.25  # uniform over 20
    logits[1, 49] = -3.0  # single finite word
    logits[2] = torch.linspace(-1, 1, 50)
    for q in (1.0, 2.0, 0.5):
        entropy = tsallis_entropy(logits, q, backend=backend).cpu().double()
        uniform = math.log(20) if q == 1.0 else (1 - 20 ** (1 - q)) / (q - 1)
        assert entropy[0].item() == pytest.approx(uniform, rel=1e-5)
        assert entropy[1].item() == pytest.approx(0.0, abs=1e-6)
        assert entropy[2].item() == pytest.approx(reference_entropy(logits[2:3].cpu(), q).item(), rel=1e-5)


@grid(device=DEVICES, backend=BACKENDS)
def test_entropy_leading_dims_and_views(device, backend):
    """[..., V] with leading dims; transposed (stride(-1) != 1) and strided 3-D views."""
    require_backend(backend, device)
    base = random_logits(4 * 6, 33, torch.float32, device).reshape(4, 6, 33)
    transposed = base.reshape(24, 33).t().contiguous().t()  # same values, column-major
    assert transposed.stride(-1) != 1
    strided_3d = base.transpose(0, 1)  # [6, 4, 33], rows not flattenable as one stride
    expected = reference_entropy(base, 2.0)
    assert_close(tsallis_entropy(base, 2.0, backend=backend), expected, 2e-5, 2e-6, "3-D")
    assert_close(tsallis_entropy(transposed, 2.0, backend=backend), expected.reshape(24), 2e-5, 2e-6, "transposed")
    assert_close(tsallis_entropy(strided_3d, 2.0, backend=backend), expected.transpose(0, 1), 2e-5, 2e-6, "strided")
    single = tsallis_entropy(base[0, 0], 2.0, backend=backend)
    assert single.shape == ()
    assert tsallis_entropy(base[:0], 2.0, backend=backend).shape == (0, 6)


@grid(device=DEVICES, backend=["triton", "cpp"])
def test_strided_rows_reach_kernels_without_copy(device, backend, monkeypatch):
    """Rows of a wider buffer (and [B, S, V] views that flatten to them) are not copied."""
    require_backend(backend, device)
    calls = spy_on_kernels(monkeypatch, entropy_module.ENTROPY_KERNELS, backend)
    wide = random_logits(12, 40, torch.float32, device)
    rows = wide[:, 3:33]
    tsallis_entropy(rows, 2.0, backend=backend)
    tsallis_entropy(rows.reshape(3, 4, 30), 2.0, backend=backend)
    seen = [(logits.data_ptr(), logits.stride()) for logits, _ in calls["forward"]]
    assert seen == [(rows.data_ptr(), (40, 1))] * 2


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("q", Q_VALUES)
def test_entropy_eager_gradcheck(q):
    """Eager autograd in float64, first and second order (the exact structural term needs both)."""
    logits = torch.randn(3, 7, dtype=torch.float64)
    logits[0, :3] = float("-inf")
    logits.requires_grad_()
    fn = lambda z: tsallis_entropy(z, q, backend="eager")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck(fn, (logits,))
    grad_out = torch.randn(3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(fn(logits), logits, grad_out)
    assert_close(grad, reference_entropy_grad(logits.detach(), q, grad_out), 1e-10, 1e-12, "eager grad")


@SMALL_VOCAB_GRID
def test_entropy_grad_matches_float64(device, backend, dtype, vocab, q):
    require_backend(backend, device)
    values = random_logits(4, vocab, dtype, device)
    values[2, 1:] = float("-inf")
    logits = strided_rows(values).requires_grad_()
    grad_out = torch.randn(4, dtype=torch.float64).to(device)
    (grad,) = torch.autograd.grad(tsallis_entropy(logits, q, backend=backend), logits, grad_out)
    assert grad.dtype == dtype and grad.shape == logits.shape
    expected = reference_entropy_grad(values, q, grad_out)
    assert torch.all(grad[2, 1:] == 0), "masked logits get zero gradient"
    # Storage rounding relative to the row's largest gradient.
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert_close(grad / scale.to(device), expected / scale, rtol=0, atol=GRAD_RTOL[dtype], what="grad")


@grid(device=DEVICES, backend=BACKENDS, vocab=[32003, 128256])
def test_entropy_grad_large_vocab(device, backend, vocab):
    require_backend(backend, device)
    values = random_logits(2, vocab, torch.bfloat16, device, scale=2.0)
    logits = values.clone().requires_grad_()
    grad_out = torch.tensor([0.7, -1.3], dtype=torch.float64)
    for q in (1.0, 2.0):
        (grad,) = torch.autograd.grad(tsallis_entropy(logits, q, backend=backend), logits, grad_out.to(device))
        expected = reference_entropy_grad(values, q, grad_out)
        scale = expected.abs().amax(dim=-1, keepdim=True)
        # bf16 storage: two ulps of the row's largest gradient.
        assert_close(grad / scale.to(device), expected / scale, 0, GRAD_RTOL[torch.bfloat16], f"grad V={vocab}")


# Gradients at logits offset by up to 1e4 in float32, relative to the row's largest term
# (entropy_grad_term_scale): the backends rebuild p = exp((z - m) - log s) with z - m exact,
# so only float32 rounding of O(1) quantities remains (measured <= 1e-6; before the row
# max and log-sum were saved apart, p = exp(z - lse) was off by ~|z|·2^-24: 3e-4 at 1e4).
LARGE_OFFSET_GRAD_TOL = 1e-5


@grid(device=DEVICES, backend=BACKENDS, q=[0.5, 1.0, 2.0, 3.5], offset=[1e4, -1e4, 3e3])
def test_entropy_grad_exact_at_large_offsets(device, backend, q, offset):
    require_backend(backend, device)
    values = (torch.randn(5, 301, dtype=torch.float64) * 3 + offset).float().to(device)
    values[3, ::3] = float("-inf")
    logits = strided_rows(values).requires_grad_()
    grad_out = torch.randn(5, dtype=torch.float64)
    entropy = tsallis_entropy(logits, q, backend=backend)
    (grad,) = torch.autograd.grad(entropy, logits, grad_out.to(device))
    assert_close(entropy, reference_entropy(values, q), 1e-5, 1e-6, "entropy at a large offset")
    scale = entropy_grad_term_scale(values, q, grad_out)
    expected = reference_entropy_grad(values, q, grad_out)
    assert_close(grad / scale.to(device), expected / scale, 0, LARGE_OFFSET_GRAD_TOL, "grad at a large offset")


@grid(device=DEVICES, backend=BACKENDS, q=[2.0, 3.5], vocab=[14, 32003])
def test_entropy_grad_exact_at_high_entropy(device, backend, q, vocab):
    """Near-uniform rows, where P_q = Σ p^q is small: rebuilt as 1 - (q - 1)·S from the
    float32 entropy it lost (q - 1)·ulp(S)/P_q (1.3e-4 at V = 32003, q = 2); the forward
    now saves P_q itself."""
    require_backend(backend, device)
    values = (torch.randn(3, vocab, dtype=torch.float64) * 0.1).float().to(device)
    logits = values.clone().requires_grad_()
    grad_out = torch.randn(3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(tsallis_entropy(logits, q, backend=backend), logits, grad_out.to(device))
    scale = entropy_grad_term_scale(values, q, grad_out)
    expected = reference_entropy_grad(values, q, grad_out)
    assert_close(grad / scale.to(device), expected / scale, 0, LARGE_OFFSET_GRAD_TOL, "grad at high entropy")


@grid(device=DEVICES, backend=BACKENDS, q=[0.5, 1.0, 2.0])
def test_fused_linear_entropy_grad_exact_at_large_offsets(device, backend, q):
    """Logits 1e4 + O(1) from an lm head whose float32 products are exact (multiples of
    1/64 below 2^17), so the reference reads the same logits the backends see."""
    require_backend(backend, device)
    hidden = (torch.randint(-16, 17, (9, 12)) / 8.0).to(device)
    weight = (torch.randint(-16, 17, (37, 12)) / 8.0).to(device)
    hidden[:, 0], weight[:, 0] = 1e4, 1.0
    logits = hidden.double().cpu() @ weight.double().cpu().T
    assert torch.equal((hidden @ weight.T).double().cpu(), logits)
    hidden_leaf, weight_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    grad_out = torch.randn(9, dtype=torch.float64)
    entropy = fused_linear_entropy(hidden_leaf, weight_leaf, q, chunk_size=4, backend=backend)
    grads = torch.autograd.grad(entropy, (hidden_leaf, weight_leaf), grad_out.to(device))
    grad_logits = reference_entropy_grad(logits, q, grad_out)
    expected = (grad_logits @ weight.double().cpu(), grad_logits.T @ hidden.double().cpu())
    for name, actual, reference in zip(("hidden", "weight"), grads, expected):
        scale = reference.abs().max()
        # float32 matmuls of the gradient add ~1e-6 relative to the largest entry
        assert_close(actual / scale.to(device), reference / scale, 0, LARGE_OFFSET_GRAD_TOL, f"fused grad {name}")


@grid(device=DEVICES, backend=BACKENDS)
def test_entropy_grad_of_3d_view(device, backend):
    """The gradient reaches a [B, S, V] input through the flattening, with the input's strides."""
    require_backend(backend, device)
    base = random_logits(12, 19, torch.float32, device).reshape(3, 4, 19)
    view = base.transpose(0, 1).requires_grad_()
    grad_out = torch.randn(4, 3, device=device)
    (grad,) = torch.autograd.grad(tsallis_entropy(view, 0.5, backend=backend), view, grad_out)
    expected = reference_entropy_grad(view.detach(), 0.5, grad_out)
    assert_close(grad, expected, 1e-5, 1e-7, "3-D view grad")


# ----------------------------------------------------------------------------- fused linear


def fused_inputs(dtype, device, tokens=10, dim=16, vocab=37):
    hidden = torch.randn(tokens, dim, dtype=torch.float64).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, dim, dtype=torch.float64) / 2).to(device=device, dtype=dtype)
    return hidden, weight


@grid(device=DEVICES, backend=BACKENDS, dtype=DTYPES, q=[0.5, 1.0, 2.0])
def test_fused_linear_entropy_matches_float64(device, backend, dtype, q):
    require_backend(backend, device)
    hidden, weight = fused_inputs(dtype, device)
    hidden_leaf = hidden.clone().requires_grad_()
    weight_leaf = weight.clone().requires_grad_()
    grad_out = torch.randn(10, dtype=torch.float64)
    entropy = fused_linear_entropy(hidden_leaf, weight_leaf, q, chunk_size=3, backend=backend)
    grad_hidden, grad_weight = torch.autograd.grad(entropy, (hidden_leaf, weight_leaf), grad_out.to(device))

    # The op rounds each chunk's logits to dtype (as a real lm head does); the reference
    # takes the same rounded chunks, so only float32 summation error remains.
    logits = torch.cat([hidden[start : start + 3] @ weight.T for start in range(0, 10, 3)]).double()
    assert entropy.dtype == torch.float32
    assert_close(entropy, reference_entropy(logits, q), 1e-5, 1e-6, "fused entropy")

    grad_logits = reference_entropy_grad(logits, q, grad_out)
    expected_hidden = grad_logits @ weight.double().cpu()
    expected_weight = grad_logits.T @ hidden.double().cpu()
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    # Relative to the largest entry: dlogits rounded to dtype, then a matmul rounded to
    # dtype, ~2 ulps of the storage format (measured 8e-3 for bf16), with a 3x margin.
    grad_tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}[dtype]
    for name, actual, expected in (("hidden", grad_hidden, expected_hidden), ("weight", grad_weight, expected_weight)):
        scale = expected.abs().max()
        assert_close(actual / scale.to(device), expected / scale, 0, grad_tol, f"fused grad {name}")


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_fused_linear_entropy_eager_gradcheck(q):
    """Float64 gradcheck of the chunked Function (its closed-form per-chunk backward)."""
    hidden, weight = fused_inputs(torch.float64, "cpu", tokens=5, dim=4, vocab=6)
    hidden.requires_grad_()
    weight.requires_grad_()
    fn = lambda h, w: fused_linear_entropy(h, w, q, chunk_size=2, backend="eager")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@grid(device=DEVICES, backend=BACKENDS)
def test_fused_linear_entropy_chunk_bound(device, backend, monkeypatch):
    """Every logits tensor the entropy kernels see, forward and backward, has <= chunk_size
    rows, and the chunks cover every token once per pass."""
    require_backend(backend, device)
    calls = spy_on_kernels(monkeypatch, entropy_module.ENTROPY_KERNELS, backend)
    hidden, weight = fused_inputs(torch.float32, device, tokens=11, vocab=23)
    hidden.requires_grad_()
    entropy = fused_linear_entropy(hidden, weight, 2.0, chunk_size=4, backend=backend)
    entropy.sum().backward()
    # forward(logits, q), backward(grad_entropy, logits, entropy, row_max, log_sum, power_sum, q)
    seen = {
        "forward": [tuple(args[0].shape) for args in calls["forward"]],
        "backward": [tuple(args[1].shape) for args in calls["backward"]],
    }
    for direction, shapes in seen.items():
        assert shapes == [(4, 23), (4, 23), (3, 23)], f"{direction} chunks {shapes}"
    assert hidden.grad is not None and weight.grad is None

    assert default_chunk_size(128256) == 1024, "whole 256-row tiles, W read once per 1024 tokens"
    assert default_chunk_size(32000) % 256 == 0 and default_chunk_size(32000) * 32000 <= DEFAULT_CHUNK_ELEMENTS
    assert default_chunk_size(2**20) == 128  # past 2^19 words the memory bound wins
    assert default_chunk_size(10**9) == 1


@grid(device=DEVICES, backend=BACKENDS)
def test_fused_linear_entropy_bf16_weight_grad_sums_in_float32(device, backend):
    """bf16 weights, 160 chunks: grad_weight is summed over the chunks in float32 and
    rounded to bf16 once. Its error relative to the largest entry is then that of the bf16
    gradient of the logits and the final rounding (measured 2-4e-3; bound 6e-3), where a
    bf16 sum was 2.3e-2. The interpreter's truncating bf16 stores of the logits' gradient
    add a bias (measured 4.8e-3, bound 1e-2; 1.6e-2 summed in bf16)."""
    require_backend(backend, device)
    tokens, chunk = 640, 4
    hidden, weight = fused_inputs(torch.bfloat16, device, tokens=tokens, dim=8, vocab=67)
    hidden = hidden + 1.0  # a common component: every chunk adds to grad_weight with one sign
    weight_leaf = weight.clone().requires_grad_()
    grad_out = torch.rand(tokens, dtype=torch.float64) + 0.5
    entropy = fused_linear_entropy(hidden, weight_leaf, 2.0, chunk_size=chunk, backend=backend)
    (grad_weight,) = torch.autograd.grad(entropy, weight_leaf, grad_out.to(device, torch.float32))
    logits = torch.cat([hidden[start : start + chunk] @ weight.T for start in range(0, tokens, chunk)]).double()
    expected = reference_entropy_grad(logits, 2.0, grad_out).T @ hidden.double().cpu()
    assert grad_weight.dtype == torch.bfloat16
    scale = expected.abs().max()
    tol = 1e-2 if backend == "triton" and device == "cpu" else 6e-3
    assert_close(grad_weight.cpu() / scale, expected / scale, 0, tol, "bf16 grad_weight over 160 chunks")


@grid(device=DEVICES, backend=BACKENDS)
def test_fused_linear_entropy_default_chunk(device, backend):
    require_backend(backend, device)
    hidden, weight = fused_inputs(torch.float32, device, tokens=6, vocab=9)
    assert_close(
        fused_linear_entropy(hidden, weight, 1.0, backend=backend),
        reference_entropy(hidden.double() @ weight.double().T, 1.0),
        1e-5, 1e-6, "default chunk",
    )


@grid(device=DEVICES, backend=BACKENDS)
def test_float64_inputs_and_no_tokens(device, backend):
    """float64 in, float64 out (triton and cpp still accumulate in float32); T == 0 works."""
    require_backend(backend, device)
    logits = random_logits(3, 40, torch.float64, device).requires_grad_()
    entropy = tsallis_entropy(logits, 1.5, backend=backend)
    assert entropy.dtype == torch.float64
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    assert grad.dtype == torch.float64
    # float32 accumulation on triton/cpp (eager is float64).
    assert_close(entropy, reference_entropy(logits.detach(), 1.5), 2e-5, 2e-6, "float64 entropy")
    assert_close(grad, reference_entropy_grad(logits.detach(), 1.5, torch.ones(3)), 1e-5, 1e-7, "float64 grad")

    hidden, weight = fused_inputs(torch.float64, device)
    hidden.requires_grad_()
    fused = fused_linear_entropy(hidden, weight, 1.5, chunk_size=4, backend=backend)
    assert fused.dtype == torch.float64
    assert_close(fused, reference_entropy(hidden.detach() @ weight.T, 1.5), 2e-5, 2e-6, "float64 fused")
    fused.sum().backward()
    assert hidden.grad.dtype == torch.float64

    no_tokens = fused_linear_entropy(hidden[:0], weight, 1.5, backend=backend)
    assert no_tokens.shape == (0,) and no_tokens.dtype == torch.float64
    assert tsallis_entropy(logits[:0], 1.5, backend=backend).shape == (0,)


# ----------------------------------------------------------------------------- errors


def test_entropy_bad_input():
    logits = torch.randn(3, 5)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        tsallis_entropy([[1.0, 2.0]], 2.0)
    with pytest.raises(TypeError, match="logits must have dtype"):
        tsallis_entropy(torch.ones(3, 5, dtype=torch.int64), 2.0)
    with pytest.raises(ValueError, match="logits must have at least 1 dimensions"):
        tsallis_entropy(torch.tensor(1.0), 2.0)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        tsallis_entropy(torch.randn(3, 0), 2.0)
    for bad_q in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="q must be a finite number > 0"):
            tsallis_entropy(logits, bad_q)
    with pytest.raises(TypeError, match="q must be a number"):
        tsallis_entropy(logits, "2")
    with pytest.raises(ValueError, match="unknown backend"):
        tsallis_entropy(logits, 2.0, backend="cuda")


@grid(device=DEVICES, backend=BACKENDS)
def test_entropy_all_masked_row(device, backend):
    require_backend(backend, device)
    logits = torch.randn(3, 5, device=device)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        tsallis_entropy(logits, 2.0, backend=backend)


def test_fused_linear_entropy_bad_input():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="hidden must have 2 dimensions"):
        fused_linear_entropy(hidden[0], weight, 2.0)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        fused_linear_entropy(hidden, weight[0], 2.0)
    with pytest.raises(ValueError, match=r"weight must be \[V, D\]"):
        fused_linear_entropy(hidden, torch.randn(5, 4), 2.0)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        fused_linear_entropy(hidden, torch.randn(0, 3), 2.0)
    with pytest.raises(TypeError, match="weight dtype"):
        fused_linear_entropy(hidden, weight.double(), 2.0)
    with pytest.raises(TypeError, match="hidden must have dtype"):
        fused_linear_entropy(hidden.long(), weight, 2.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_entropy(hidden, weight, 2.0, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        fused_linear_entropy(hidden, weight, 2.0, chunk_size=2.5)
    with pytest.raises(ValueError, match="q must be a finite number > 0"):
        fused_linear_entropy(hidden, weight, 0.0)
    with pytest.raises(ValueError, match="one device"):
        fused_linear_entropy(hidden, weight.to("meta"), 2.0)


@grid(device=DEVICES, backend=BACKENDS)
def test_entropy_check_finite_false_reads_no_device_value(device, backend, monkeypatch):
    """check_finite=False (a decode step in a CUDA graph): forward and backward read no
    device value on the host, a row of all -inf gets a NaN entropy on every backend, the
    other rows and their gradients are exact. The default still raises (and reads)."""
    require_backend(backend, device)
    logits = random_logits(3, 37, torch.float32, device)
    logits[1] = float("-inf")
    leaf = logits.clone().requires_grad_()
    grad_out = torch.tensor([0.5, 0.0, -1.5], dtype=torch.float64)
    with monkeypatch.context() as patch:
        forbid_host_reads(patch)
        entropy = tsallis_entropy(leaf, 2.0, backend=backend, check_finite=False)
        (grad,) = torch.autograd.grad(entropy, leaf, grad_out.to(device, torch.float32))
    assert torch.isnan(entropy[1]).item()
    kept = [0, 2]
    assert_close(entropy[kept], reference_entropy(logits[kept], 2.0), 2e-5, 2e-6, "finite rows, unchecked")
    assert_close(grad[kept], reference_entropy_grad(logits[kept], 2.0, grad_out[kept]), 1e-5, 1e-7, "grad, unchecked")
    with pytest.raises(ValueError, match="all -inf"):
        tsallis_entropy(logits, 2.0, backend=backend)
    with monkeypatch.context() as patch, pytest.raises(AssertionError, match="host read"):
        forbid_host_reads(patch)
        tsallis_entropy(logits, 2.0, backend=backend)


def test_named_backend_unavailable_is_clear(monkeypatch):
    """An explicitly requested backend that cannot run says so instead of failing in a kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="triton"):
        tsallis_entropy(torch.randn(2, 3), 2.0, backend="triton")


def test_entropy_kernels_compile_for_hopper():
    """The interpreter never lowers the kernels: compile them for sm_90 with the launch
    config of a Llama-3 vocabulary (BLOCK_V 4096, 8 warps), each logits dtype, Tsallis and
    Shannon, and the split-V pair; on a GPU every exp is one ex2.approx.ftz."""
    config = entropy_module.row_kernel_config(128256)
    num_warps, constexprs = config["num_warps"], {"BLOCK_V": config["BLOCK_V"]}
    specs = []
    for data in ("bf16", "fp16", "fp32"):
        for shannon in (False, True):
            signature = {
                "logits_ptr": "*" + data, "grad_logits_ptr": "*" + data, "grad_entropy_ptr": "*fp32",
                "entropy_ptr": "*fp32", "row_max_ptr": "*fp32",
                "log_sum_ptr": "*fp32", "power_sum_ptr": "*fp32", "q": "fp32",
                "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_acc_ptr": "*fp32",
            }
            for kernel in ("_entropy_forward_kernel", "_entropy_backward_kernel", "_entropy_split_kernel"):
                specs.append(dict(module="alter_kernels.entropy", kernel=kernel, signature=signature,
                                  constexprs=dict(constexprs, SHANNON=shannon), num_warps=num_warps,
                                  ptx_contains="ex2.approx.ftz.f32"))
            specs.append(dict(module="alter_kernels.entropy", kernel="_entropy_merge_kernel", signature=signature,
                              constexprs={"BLOCK_S": 32, "SHANNON": shannon}, num_warps=1))
    assert_compiles_for_hopper(specs)


def test_triton_on_a_gpu_that_is_not_the_current_one():
    """A model split over GPUs computes on cuda:1 while cuda:0 is current: the kernels must
    launch on the tensors' GPU (entropy and the inverted hinge loss, forward and backward)."""
    if "cuda" not in DEVICES or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    require_backend("triton", "cuda")
    torch.cuda.set_device(0)
    logits = random_logits(6, 1000, torch.float32, "cuda:1").requires_grad_()
    labels = torch.randint(0, 1000, (6,), device="cuda:1")
    for op in (
        lambda backend: tsallis_entropy(logits, 2.0, backend=backend).sum(),
        lambda backend: inverted_hinge_loss(logits, labels, 2.0, 10.0, backend=backend)[0],
    ):
        value = op("triton")
        (grad,) = torch.autograd.grad(value, logits)
        want = op("eager")
        (want_grad,) = torch.autograd.grad(want, logits)
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)  # float32 summation order
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
