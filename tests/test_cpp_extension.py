"""The compiled extension alter_kernels._C: torch.ops.alter_kernels.* against the float64
references of tests/_reference.py (DESIGN.md §1), moe_align against its eager reference, input
errors, fake kernels and torch.compile.

Precision model: the reference is computed in float64 from the *same* (already rounded)
logits the kernel reads, so for every input dtype the only error left in float32 outputs
(entropy, log-sum, loss) is the kernel's float32 arithmetic; gradients in float16/bfloat16 are
also rounded once to the output dtype.
"""
import os

import pytest
import torch

from _reference import (
    grid,
    is_shannon,
    log_softmax64,
    reference_entropy,
    reference_entropy_grad,
    reference_ihl,
    reference_max_and_log_sum,
)
from alter_kernels._dispatch import cpp_extension
from alter_kernels.routing import moe_align_eager
from conftest import require_backend
from conftest import test_devices as devices_under_test  # aliased: pytest would collect test_*

_C = cpp_extension()
ops = torch.ops.alter_kernels if _C is not None else None
pytestmark = pytest.mark.skipif(_C is None, reason="alter_kernels._C is not built (ALTER_NO_EXT=1 or no compiler)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QS = [0.5, 1.0, 2.0, 3.5]
VOCABS = [1, 7, 1000, 32003]
IGNORE = -100
# float32 kernel arithmetic on sums over up to 32k terms, against float64
F32_TOL = dict(rtol=2e-5, atol=2e-5)
# Gradients: one rounding to the output dtype (rtol: an ulp; atol: float16's subnormal
# step, else the kernels' flush of probabilities below e^-87 to 0), plus float32 error
# relative to the size of the terms that cancel in the formula (p_j^q against p_j P_q,
# for instance), which the float32 log-sum input limits to ~1e-6.
GRAD_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-30),
    torch.float16: dict(rtol=1e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-30),
}
TERM_RTOL = 2e-5
# Every device, dtype, q and vocabulary size.
GRID = grid(device=devices_under_test(), dtype=DTYPES, q=QS, V=VOCABS)


def test_extension_is_built_unless_disabled():
    """CI builds the extension; only ALTER_NO_EXT=1 may leave it out."""
    if os.environ.get("ALTER_NO_EXT", "0") == "1":
        pytest.skip("ALTER_NO_EXT=1: the extension was deliberately not built")
    assert _C is not None
    assert isinstance(_C.WITH_CUDA, bool)


# ----------------------------------------------------------------------------------------
# inputs and float64 references


def make_logits(T, V, dtype, device, *, scale=3.0, neg_inf=True, row_pad=5):
    """Random [T, V] logits with a row stride of V + row_pad (not contiguous), some -inf
    entries (never a whole row) and one row at |z| ~ 1e4."""
    base = torch.randn(T, V + row_pad, dtype=torch.float64) * scale
    z = base[:, :V]
    if neg_inf and V > 1:
        mask = torch.rand(T, V) < 0.25
        mask[torch.arange(T), torch.randint(V, (T,))] = False  # keep one finite logit per row
        z[mask] = float("-inf")
    if T > 1:
        z[1] = (z[1] / scale).clamp(-6, 6) * 1e4  # huge logits (within float16): nearly one-hot softmax
    return base.to(dtype=dtype, device=device)[:, :V]


def entropy_grad_terms(z, q, grad_entropy):
    """Per entry, the size of the terms that cancel in the gradient formulas (the float32
    error of the kernels scales with it)."""
    entropy = reference_entropy(z, q)[:, None]
    log_p = log_softmax64(z)
    p = log_p.exp()
    g = grad_entropy.double().cpu()[:, None]
    if is_shannon(q):
        return g.abs() * p * (log_p.clamp(min=-1e300).abs() + entropy + 1)
    p_q = torch.exp(q * log_p)
    # the kernel gets P_q = 1 - (q-1) S from float32 S: that cancels when P_q << 1
    P_q_size = p_q.sum(-1, keepdim=True) + abs(q - 1.0) * entropy.abs()
    return (g * q / (q - 1.0)).abs() * (p_q + p * P_q_size)


def ihl_grad_terms(z, labels, runner_up, grad_loss):
    """Per entry, the size of the terms of g (p_y (δ_jy - p_j) - p_v* (δ_jv* - p_j))."""
    p = log_softmax64(z).exp()
    V = z.shape[1]
    kept = labels.cpu() != IGNORE
    y = torch.where(kept, labels.cpu(), 0)
    p_y = p.gather(1, y[:, None])[:, 0]
    has_other = runner_up >= 0
    p_other = torch.where(has_other, p.gather(1, runner_up.clamp(min=0)[:, None])[:, 0], 0.0)
    onehot_y = torch.nn.functional.one_hot(y, V).double()
    onehot_v = torch.nn.functional.one_hot(runner_up.clamp(min=0), V).double() * has_other[:, None]
    g = grad_loss.double().cpu()[:, None] * kept[:, None]
    return g.abs() * (p_y + p_other)[:, None] * (p + onehot_y + onehot_v)


def assert_close64(actual, expected, **tol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=False, **tol)


def assert_entropy_grad_close(actual, z, q, grad_entropy, dtype):
    """assert_grad_close against the float64 entropy gradient."""
    expected = reference_entropy_grad(z, q, grad_entropy)
    assert_grad_close(actual, expected, entropy_grad_terms(z, q, grad_entropy), dtype)


def assert_grad_close(actual, expected, terms, dtype):
    """|actual - expected| <= rtol |expected| + atol + TERM_RTOL * terms, entrywise."""
    tol = GRAD_TOL[dtype]
    assert torch.isfinite(actual).all()
    err = (actual.double().cpu() - expected).abs()
    bound = tol["rtol"] * expected.abs() + tol["atol"] + TERM_RTOL * terms
    worst = int((err - bound).flatten().argmax())
    assert bool((err <= bound).all()), (
        f"gradient off at flat index {worst}: got {actual.flatten()[worst].item()}, "
        f"expected {expected.flatten()[worst].item()}, allowed error {bound.flatten()[worst].item()}"
    )


# ----------------------------------------------------------------------------------------
# entropy


@GRID
def test_entropy_forward_backward(device, dtype, q, V):
    require_backend("cpp", device)
    T = 3 if V > 1000 else 6
    z = make_logits(T, V, dtype, device)
    entropy, *row_stats = ops.entropy_forward(z, q)
    for out in (entropy, *row_stats):
        assert out.dtype == torch.float32 and out.shape == (T,)
    # Tsallis q < 1 sums p^q ~ sqrt(V) terms: the error scales with |S|, hence rtol
    assert_close64(entropy, reference_entropy(z, q), **F32_TOL)
    assert_row_stats(z, *row_stats, q=q)

    grad_entropy = torch.randn(T, device=device)
    grad = ops.entropy_backward(grad_entropy, z, entropy, *row_stats, q)
    assert grad.dtype == dtype and grad.shape == (T, V) and grad.is_contiguous()
    assert_entropy_grad_close(grad, z, q, grad_entropy, dtype)


def assert_row_stats(z, row_max, log_sum, power_sum=None, q=None):
    """The row max is one of the logits (exact); log Σ e^{z - m} and P_q = Σ p^q (1 for
    Shannon; entropy_forward only) carry float32 error."""
    expected_max, expected_log_sum = reference_max_and_log_sum(z)
    assert_close64(row_max, expected_max, rtol=0, atol=0)
    assert_close64(log_sum, expected_log_sum, **F32_TOL)
    if power_sum is not None:
        expected_power_sum = torch.ones(z.shape[0]) if is_shannon(q) else (log_softmax64(z).exp() ** q).sum(-1)
        assert_close64(power_sum, expected_power_sum, **F32_TOL)


@pytest.mark.parametrize("device", devices_under_test())
def test_entropy_near_one_uses_shannon(device):
    """|q - 1| < 1e-3 is Shannon (Tsallis cancels there); just outside it is Tsallis."""
    require_backend("cpp", device)
    z = make_logits(4, 100, torch.float32, device, neg_inf=False)
    shannon = ops.entropy_forward(z, 1.0)[0]
    assert_close64(ops.entropy_forward(z, 1.0 + 5e-4)[0], shannon, rtol=0, atol=0)
    ref = reference_entropy(z, 1.0 + 2e-3)
    # 1 - P_q cancels to ~2e-3 * S: float32 error of P_q is amplified by 1 / (q - 1)
    assert_close64(ops.entropy_forward(z, 1.0 + 2e-3)[0], ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", devices_under_test())
def test_entropy_masked_chunks_and_late_max(device):
    """Rows whose leading chunks (the CPU kernel reads 1024 logits at a time) are all -inf,
    a single finite logit at either end, and a max far into the row."""
    require_backend("cpp", device)
    z = torch.randn(4, 3000, dtype=torch.float64)
    z[0, :2500] = float("-inf")
    z[1, :-1] = float("-inf")
    z[2, 1:] = float("-inf")
    z[3, 2999] = 40.0
    z = z.float().to(device)
    for q in QS:
        entropy, *row_stats = ops.entropy_forward(z, q)
        assert_close64(entropy, reference_entropy(z, q), **F32_TOL)
        assert_row_stats(z, *row_stats, q=q)
        g = torch.randn(4, device=device)
        grad = ops.entropy_backward(g, z, entropy, *row_stats, q)
        assert_entropy_grad_close(grad, z, q, g, torch.float32)


def test_float64_logits_run_in_float32_on_cpu():
    z = make_logits(3, 50, torch.float64, "cpu")
    for got, expected in zip(ops.entropy_forward(z, 2.0), ops.entropy_forward(z.float(), 2.0)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device", devices_under_test())
def test_entropy_grad_entropy_may_be_expanded(device):
    """Autograd hands expanded (stride 0) gradients, e.g. from entropy.sum()."""
    require_backend("cpp", device)
    z = make_logits(5, 33, torch.float32, device)
    entropy, *row_stats = ops.entropy_forward(z, 2.0)
    grad = ops.entropy_backward(torch.ones((), device=device).expand(5), z, entropy, *row_stats, 2.0)
    assert_entropy_grad_close(grad, z, 2.0, torch.ones(5), torch.float32)


# ----------------------------------------------------------------------------------------
# inverted hinge loss


def midpoint_threshold(entropy):
    """A threshold in the widest gap between sorted entropies, so float32 rounding cannot
    move a token across it."""
    values = entropy.sort().values
    if values.numel() < 2:
        return float(values[0]) + 1.0
    gaps = values[1:] - values[:-1]
    i = int(gaps.argmax())
    return float(values[i] + values[i + 1]) / 2


@GRID
def test_ihl_forward_backward(device, dtype, q, V):
    require_backend("cpp", device)
    T = 4 if V > 1000 else 8
    z = make_logits(T, V, dtype, device)
    labels = torch.randint(0, V, (T,))
    labels[2] = IGNORE
    labels = labels.to(device)
    threshold = midpoint_threshold(reference_entropy(z, q))
    grad_loss = torch.randn(T, device=device)
    loss, entropy, weight, row_max, log_sum, runner_up = ops.ihl_forward(z, labels, q, threshold, 0.25, IGNORE)
    ref = reference_ihl(z, labels, q, threshold, 0.25, IGNORE)
    for out in (loss, entropy, weight, row_max, log_sum):
        assert out.dtype == torch.float32 and out.shape == (T,)
    assert_close64(loss, ref.loss, **F32_TOL)
    assert_close64(entropy, ref.entropy, **F32_TOL)
    assert_close64(weight, ref.weight, rtol=0, atol=0)
    assert_row_stats(z, row_max, log_sum)
    assert loss[2] == 0 and weight[2] == 0
    # v* is chosen among the same values (float32 holds every input dtype exactly): no rounding
    assert runner_up.dtype == torch.int32 and torch.equal(runner_up.cpu().long(), ref.runner_up)

    grad = ops.ihl_backward(grad_loss, z, labels, row_max, log_sum, runner_up, IGNORE)
    assert grad.dtype == dtype and grad.shape == (T, V)
    expected = grad_loss.double().cpu()[:, None] * ref.grad
    assert_grad_close(grad, expected, ihl_grad_terms(z, labels, ref.runner_up, grad_loss), dtype)
    assert (grad[2] == 0).all()


@pytest.mark.parametrize("device", devices_under_test())
def test_ihl_vocab_of_one(device):
    """V == 1: max over the empty set of other tokens is 0, so L = 1 + 1 - 0 = 2 and dL = 0."""
    require_backend("cpp", device)
    z = torch.randn(3, 1, device=device)
    labels = torch.tensor([0, IGNORE, 0], device=device)
    loss, entropy, weight, row_max, log_sum, runner_up = ops.ihl_forward(z, labels, 2.0, 1.2, 0.0, IGNORE)
    assert loss.tolist() == [2.0, 0.0, 2.0]
    assert entropy.tolist() == [0.0, 0.0, 0.0] and weight.tolist() == [1.0, 0.0, 1.0]
    assert_close64(row_max, z[:, 0], rtol=0, atol=0)
    assert log_sum.tolist() == [0.0, 0.0, 0.0]
    assert runner_up.tolist() == [-1, -1, -1]
    grad = ops.ihl_backward(torch.ones(3, device=device), z, labels, row_max, log_sum, runner_up, IGNORE)
    assert (grad == 0).all()


@pytest.mark.parametrize("device", devices_under_test())
def test_ihl_custom_ignore_index(device):
    require_backend("cpp", device)
    z = make_logits(5, 11, torch.float32, device, neg_inf=False)
    labels = torch.tensor([3, -1, 0, 10, -1], device=device)
    loss, _, weight, row_max, log_sum, runner_up = ops.ihl_forward(z, labels, 1.0, 100.0, 0.0, -1)
    assert loss[1] == 0 and loss[4] == 0 and (loss[[0, 2, 3]] > 0).all()
    assert weight.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert runner_up[1] == -1 and runner_up[4] == -1
    grad = ops.ihl_backward(torch.ones(5, device=device), z, labels, row_max, log_sum, runner_up, -1)
    assert (grad[[1, 4]] == 0).all() and (grad[[0, 2, 3]] != 0).any()


# ----------------------------------------------------------------------------------------
# moe_align


# Past 4096 slots the CUDA kernel splits the slots over several blocks (3001·3: 3 blocks;
# 1500·3 with the most experts: 2 blocks of one warp; 8192·3: 6 blocks).
@grid(device=devices_under_test(), block_m=[1, 3, 16, 64])
@pytest.mark.parametrize(
    "T,K,N", [(0, 2, 4), (1, 1, 1), (37, 3, 5), (100, 2, 8), (257, 3, 16), (3001, 3, 8), (1500, 3, 4096), (8192, 3, 64)]
)
def test_moe_align_matches_eager(device, T, K, N, block_m):
    require_backend("cpp", device)
    experts = torch.randint(-1, N, (T, K), dtype=torch.int32)
    if N > 2:
        experts[experts == 1] = 2  # expert 1 gets no token
    experts = experts.to(device)
    got = ops.moe_align(experts, N, block_m)
    expected = moe_align_eager(experts.cpu(), N, block_m)
    for g, e in zip(got, expected):
        assert g.dtype == torch.int32 and g.device.type == torch.device(device).type
        assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("device", devices_under_test())
def test_moe_align_non_contiguous_and_all_dropped(device):
    require_backend("cpp", device)
    experts = torch.randint(-1, 6, (40, 3), dtype=torch.int32, device=device).t().contiguous().t()
    assert not experts.is_contiguous()
    for g, e in zip(ops.moe_align(experts, 6, 8), moe_align_eager(experts.cpu(), 6, 8)):
        assert torch.equal(g.cpu(), e)
    dropped = torch.full((9, 2), -1, dtype=torch.int32, device=device)
    sorted_ids, block_expert, num_padded = ops.moe_align(dropped, 4, 4)
    assert num_padded.item() == 0 and (sorted_ids == 18).all() and (block_expert == -1).all()


# ----------------------------------------------------------------------------------------
# input errors


def test_logits_errors():
    z = torch.randn(4, 6)
    with pytest.raises(TypeError, match=r"entropy_forward: logits must be a floating-point tensor \(float32, float16, bfloat16 or float64\)"):
        ops.entropy_forward(z.to(torch.int32), 2.0)
    with pytest.raises(ValueError, match=r"entropy_forward: logits must be a 2-D \[T, V\] tensor"):
        ops.entropy_forward(z[0], 2.0)
    with pytest.raises(ValueError, match="entropy_forward: logits must have stride 1 in its last dimension"):
        ops.entropy_forward(torch.randn(6, 4).t(), 2.0)
    with pytest.raises(ValueError, match="at least one column"):
        ops.entropy_forward(torch.randn(4, 0), 2.0)
    with pytest.raises(ValueError, match="entropy_forward: q must be a finite number > 0"):
        ops.entropy_forward(z, 0.0)
    entropy, row_max, log_sum, power_sum = ops.entropy_forward(z, 2.0)
    with pytest.raises(ValueError, match=r"entropy_backward: grad_entropy must have shape \[4\]"):
        ops.entropy_backward(torch.ones(5), z, entropy, row_max, log_sum, power_sum, 2.0)
    with pytest.raises(TypeError, match="entropy_backward: row_max must be float32"):
        ops.entropy_backward(torch.ones(4), z, entropy, row_max.double(), log_sum, power_sum, 2.0)
    with pytest.raises(ValueError, match=r"entropy_backward: log_sum must have shape \[4\]"):
        ops.entropy_backward(torch.ones(4), z, entropy, row_max, log_sum[:2], power_sum, 2.0)
    with pytest.raises(TypeError, match="entropy_backward: power_sum must be float32"):
        ops.entropy_backward(torch.ones(4), z, entropy, row_max, log_sum, power_sum.half(), 2.0)
    max_and_log_sum = (row_max, log_sum)  # what ihl_backward takes
    labels = torch.tensor([0, 1, IGNORE, 5])
    with pytest.raises(TypeError, match="ihl_forward: labels must be int64"):
        ops.ihl_forward(z, labels.int(), 2.0, 1.2, 0.0, IGNORE)
    with pytest.raises(ValueError, match=r"ihl_forward: labels must have shape \[4\]"):
        ops.ihl_forward(z, labels[:3], 2.0, 1.2, 0.0, IGNORE)
    with pytest.raises(ValueError, match=r"ihl_forward: labels\[3\] = 6 is outside \[0, 6\)"):
        ops.ihl_forward(z, torch.tensor([0, 1, IGNORE, 6]), 2.0, 1.2, 0.0, IGNORE)
    runner_up = torch.tensor([1, 0, -1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"ihl_backward: labels\[0\] = -3 is outside"):
        ops.ihl_backward(torch.ones(4), z, torch.tensor([-3, 1, 2, 3]), *max_and_log_sum, runner_up, IGNORE)
    with pytest.raises(TypeError, match="ihl_backward: runner_up must be int32"):
        ops.ihl_backward(torch.ones(4), z, labels, *max_and_log_sum, runner_up.long(), IGNORE)
    with pytest.raises(ValueError, match=r"ihl_backward: runner_up must have shape \[4\]"):
        ops.ihl_backward(torch.ones(4), z, labels, *max_and_log_sum, runner_up[:3], IGNORE)
    for bad in (-2, 6):
        with pytest.raises(ValueError, match=rf"ihl_backward: runner_up\[1\] = {bad} is outside \[-1, 6\)"):
            ops.ihl_backward(torch.ones(4), z, labels, *max_and_log_sum, torch.tensor([1, bad, -1, 0], dtype=torch.int32), IGNORE)


def test_moe_align_errors():
    experts = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="moe_align: experts must be int32"):
        ops.moe_align(experts.long(), 4, 8)
    with pytest.raises(ValueError, match=r"moe_align: experts must be a 2-D \[T, K\] tensor"):
        ops.moe_align(experts.flatten(), 4, 8)
    with pytest.raises(ValueError, match="moe_align: block_m must be >= 1"):
        ops.moe_align(experts, 4, 0)
    with pytest.raises(ValueError, match="moe_align: num_experts must be >= 1"):
        ops.moe_align(experts, 0, 8)
    experts[1, 1] = 4
    with pytest.raises(ValueError, match=r"moe_align: experts must hold values in \[-1, num_experts = 4\), got 4"):
        ops.moe_align(experts, 4, 8)


# ----------------------------------------------------------------------------------------
# fake kernels, torch.compile


def _opcheck_cases():
    z = make_logits(3, 10, torch.float32, "cpu")
    labels = torch.tensor([1, IGNORE, 9])
    entropy, *row_stats = ops.entropy_forward(z, 2.0)
    row_max, log_sum = row_stats[:2]
    runner_up = ops.ihl_forward(z, labels, 1.0, 1.2, 0.0, IGNORE)[5]
    g = torch.randn(3)
    experts = torch.randint(-1, 4, (5, 2), dtype=torch.int32)
    return [
        (ops.entropy_forward, (z, 2.0)),
        (ops.entropy_backward, (g, z, entropy, *row_stats, 2.0)),
        (ops.ihl_forward, (z, labels, 1.0, 1.2, 0.0, IGNORE)),
        (ops.ihl_backward, (g, z, labels, row_max, log_sum, runner_up, IGNORE)),
        (ops.moe_align, (experts, 4, 3)),
    ]


def test_opcheck_schemas_and_fake_kernels():
    """torch.library.opcheck: schema, fake kernel shapes/dtypes and AOT dispatch agree with
    the real kernels."""
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    def token_scores(z):
        entropy, row_max, log_sum, power_sum = torch.ops.alter_kernels.entropy_forward(z, 2.0)
        return entropy * 2.0 + row_max + log_sum * power_sum

    z = make_logits(5, 37, torch.float32, "cpu")
    compiled = torch.compile(token_scores, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), token_scores(z), rtol=0, atol=0)
