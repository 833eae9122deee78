"""inverted_hinge_loss: every backend against the float64 per-token
reference of tests/_reference.py.

Tolerances: backends accumulate in float32 on the same rounded inputs the reference reads,
so losses (in [0, 2]) and probabilities carry float32 error only (~1e-6). Gradients are
stored in the logits' dtype: compared relative to the largest entry with two ulps of the
storage format (one for rounding, one more for the interpreter's truncating stores).
"""
import pytest
import torch

import alter_kernels.ihl as ihl_module
from alter_kernels import inverted_hinge_loss
from _reference import (
    assert_close, assert_compiles_for_hopper, forbid_host_reads, grid, random_logits, reduce_reference, reference_entropy, reference_ihl,
    spy_on_kernels, strided_rows, threshold_between,
)
from conftest import require_backend
from conftest import test_devices as devices_under_test  # renamed: pytest would collect test_*

DEVICES = devices_under_test()
BACKENDS = ["eager", "triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100
HIGH_ENTROPY_WEIGHT = 0.3
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}


# ----------------------------------------------------------------------------- inputs


def ihl_inputs(vocab, dtype, device, scale=3.0):
    """Six tokens: random, ignored, half-masked vocabulary, masked target (p_y = 0), only the
    target unmasked (L = 2), random; as a non-contiguous row view."""
    logits = random_logits(6, vocab, dtype, device, scale=scale)
    labels = torch.randint(0, vocab, (6,))
    labels[1] = IGNORE
    if vocab > 1:
        logits[2, : vocab // 2] = float("-inf")
        labels[2] = vocab - 1
        logits[3, 0] = float("-inf")
        labels[3] = 0
        logits[4] = float("-inf")
        logits[4, labels[4]] = 1.5
    return strided_rows(logits), labels.to(device)


def run_backend(logits, labels, q, threshold, reduction, backend, **kwargs):
    """(loss, entropy, grad_logits) of the op, the gradient for an all-ones upstream gradient."""
    leaf = logits.detach().requires_grad_()  # keeps the view's strides
    loss, entropy = inverted_hinge_loss(
        leaf, labels, q, threshold, reduction=reduction, backend=backend, **kwargs
    )
    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    return loss, entropy, grad


# ----------------------------------------------------------------------------- values and grads


@grid(device=DEVICES, backend=BACKENDS, dtype=DTYPES, vocab=[1, 7, 1000], q=[0.5, 1.0, 1.0005, 2.0, 3.5])
def test_ihl_matches_float64(device, backend, dtype, vocab, q):
    require_backend(backend, device)
    logits, labels = ihl_inputs(vocab, dtype, device)
    ignored = labels.cpu() == IGNORE
    threshold = threshold_between(reference_ihl(logits, labels, q, 0.0, 0.0).entropy, ignored)
    ref = reference_ihl(logits, labels, q, threshold, HIGH_ENTROPY_WEIGHT)
    assert (ref.weight[~ignored] == 1).any() or vocab == 1
    for reduction in REDUCTIONS:
        loss, entropy, grad = run_backend(
            logits, labels, q, threshold, reduction, backend, high_entropy_weight=HIGH_ENTROPY_WEIGHT
        )
        expected_loss, dloss = reduce_reference(ref.loss, ref.weight, reduction)
        assert loss.dtype == torch.float32 and entropy.dtype == torch.float32
        assert not entropy.requires_grad
        # float32 probabilities; losses are O(1).
        assert_close(loss, expected_loss, 1e-5, 2e-6, f"{reduction} loss")
        assert_close(entropy, ref.entropy, 2e-5, 2e-6, "entropy")
        expected_grad = dloss[:, None] * ref.grad
        assert grad.dtype == dtype
        scale = expected_grad.abs().max().clamp_min(1e-30)
        assert_close(grad.cpu() / scale, expected_grad / scale, 0, GRAD_TOL[dtype], f"{reduction} grad")


@grid(device=DEVICES, backend=BACKENDS, vocab=[32003, 128256])
def test_ihl_large_vocab(device, backend, vocab):
    require_backend(backend, device)
    logits = random_logits(3, vocab, torch.bfloat16, device, scale=4.0)
    logits[1, : vocab // 2] = float("-inf")
    labels = torch.tensor([5, vocab - 1, vocab // 3 + 7], device=device)
    ref = reference_ihl(logits, labels, 2.0, 0.7, 0.5)
    for reduction in ("mean", "none"):
        loss, entropy, grad = run_backend(logits, labels, 2.0, 0.7, reduction, backend, high_entropy_weight=0.5)
        expected_loss, dloss = reduce_reference(ref.loss, ref.weight, reduction)
        # float32 sums over 128256 terms.
        assert_close(loss, expected_loss, 2e-5, 2e-6, "loss")
        assert_close(entropy, ref.entropy, 5e-5, 1e-5, "entropy")
        expected_grad = dloss[:, None] * ref.grad
        scale = expected_grad.abs().max()
        assert_close(grad.cpu() / scale, expected_grad / scale, 0, GRAD_TOL[torch.bfloat16], "grad")


@grid(device=DEVICES, backend=BACKENDS, dtype=DTYPES)
def test_ihl_huge_logits_and_transposed_view(device, backend, dtype):
    """|z| ~ 1e4 (near one-hot and 1e4 + O(1) rows) through a column-major view."""
    require_backend(backend, device)
    values = random_logits(4, 50, dtype, device, scale=1e4)
    values[1] = (torch.randn(50, dtype=torch.float64) * 2 + 1e4).to(dtype)
    values[2] = (torch.randn(50, dtype=torch.float64) * 2 - 1e4).to(dtype)
    logits = values.t().contiguous().t()
    assert logits.stride(-1) != 1
    labels = torch.tensor([3, 17, 0, 49], device=device)
    ref = reference_ihl(values, labels, 1.0, 10.0, 0.0)
    loss, entropy, grad = run_backend(logits, labels, 1.0, 10.0, "none", backend)
    assert_close(loss, ref.loss * ref.weight, 1e-5, 2e-6, "loss")
    assert_close(entropy, ref.entropy, 2e-5, 2e-6, "entropy")
    scale = ref.grad.abs().max()
    # p = exp((z - m) - log s) with z - m exact: |z| ~ 1e4 costs no extra tolerance
    assert_close(grad.cpu() / scale, ref.grad / scale, 0, GRAD_TOL[dtype], "grad")


@grid(device=DEVICES, backend=BACKENDS, offset=[1e4, -1e4, 3e3])
def test_ihl_grad_exact_at_large_offsets(device, backend, offset):
    """float32 logits offset by up to 1e4: loss and gradient match float64 to 1e-5 of the
    largest gradient (before the row max and log-sum were saved apart, the kernel backends
    rebuilt p = exp(z - lse) and were 1.5e-4 off at 1e4)."""
    require_backend(backend, device)
    values = (torch.randn(6, 257, dtype=torch.float64) * 3 + offset).float()
    values[2, ::2] = float("-inf")
    labels = torch.randint(0, 257, (6,))
    labels[1] = IGNORE
    labels[2] = 4  # unmasked target in the half-masked row
    ref = reference_ihl(values, labels, 2.0, 1e9, 0.0)
    loss, _, grad = run_backend(strided_rows(values.to(device)), labels.to(device), 2.0, 1e9, "none", backend)
    assert_close(loss, ref.loss * ref.weight, 1e-5, 2e-6, "loss at a large offset")
    scale = ref.grad.abs().max()
    assert_close(grad.cpu() / scale, ref.grad / scale, 0, 1e-5, "grad at a large offset")


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_ties_at_huge_logits_stay_exact(device, backend):
    """Logits ~1e8 and ~1e16, where one float32 lse = m + log s rounds to m: four tied
    words give p = 1/4 each (grad [-.25, 0, 0, .25], was [-1, 0, 0, 1]); two tied words and
    a lost target give L = 0.5 (the cpp forward gave 0.0) and grad [-.25, .25, 0]."""
    require_backend(backend, device)
    logits = torch.tensor([[1e8, 1e8, 1e8, 1e8], [1e16, 1e16, 0.0, float("-inf")]], device=device)
    labels = torch.tensor([3, 2], device=device)
    loss, _, grad = run_backend(logits, labels, 2.0, 1e9, "none", backend)
    assert_close(loss, torch.tensor([1.0, 0.5], dtype=torch.float64), 0, 1e-6, "loss of ties")
    expected = torch.tensor([[-0.25, 0.0, 0.0, 0.25], [-0.25, 0.25, 0.0, 0.0]], dtype=torch.float64)
    assert_close(grad, expected, 0, 1e-6, "grad of ties")


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_runner_up_ties_take_first(device, backend):
    """Tied runners-up: v* is the lowest index on every backend (bf16 logits tie often)."""
    require_backend(backend, device)
    logits = torch.tensor(
        [[0.0, 5.0, 5.0, 1.0], [5.0, 5.0, 1.0, 5.0], [2.0, -1.0, 2.0, 2.0]], device=device
    ).to(torch.bfloat16)
    labels = torch.tensor([0, 1, 2], device=device)
    ref = reference_ihl(logits, labels, 1.0, 100.0, 0.0)
    loss, _, grad = run_backend(logits, labels, 1.0, 100.0, "none", backend)
    assert_close(loss, ref.loss, 1e-5, 2e-6, "loss")
    assert_close(grad, ref.grad, 0, GRAD_TOL[torch.bfloat16], "grad")


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_single_word_vocabulary(device, backend):
    """V == 1: p_y = 1 and the max over no other word is 0, so L = 2 with zero gradient."""
    require_backend(backend, device)
    logits = torch.randn(4, 1, device=device)
    labels = torch.tensor([0, 0, IGNORE, 0], device=device)
    loss, entropy, grad = run_backend(logits, labels, 2.0, 0.5, "none", backend)
    assert torch.equal(loss.cpu(), torch.tensor([2.0, 2.0, 0.0, 2.0]))
    assert torch.equal(entropy.cpu(), torch.zeros(4))
    assert torch.equal(grad.cpu(), torch.zeros(4, 1))


@grid(device=DEVICES, backend=BACKENDS, case=["all_ignored", "all_high_entropy"])
def test_ihl_zero_total_weight(device, backend, case):
    """Σw == 0 gives a mean of exactly 0 with zero (not NaN) gradients; the sum is 0 too."""
    require_backend(backend, device)
    logits = random_logits(5, 11, torch.float32, device)
    labels = torch.randint(0, 11, (5,), device=device)
    threshold = 0.5
    if case == "all_ignored":
        labels.fill_(IGNORE)
    else:
        threshold = float(reference_entropy(logits, 2.0).min()) - 0.1
    for reduction in REDUCTIONS:
        loss, entropy, grad = run_backend(logits, labels, 2.0, threshold, reduction, backend)
        assert torch.equal(loss.cpu(), torch.zeros(loss.shape)), f"{reduction}: {loss}"
        assert torch.equal(grad.cpu(), torch.zeros(5, 11)), f"{reduction} grad"
        assert_close(entropy, reference_entropy(logits, 2.0), 2e-5, 2e-6, "entropy")


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_high_entropy_weight_and_custom_ignore_index(device, backend):
    """All tokens high entropy with weight 0.25: the mean is the plain mean over non-ignored
    tokens; ignore_index = 3 ignores label 3 while -100 would be out of range."""
    require_backend(backend, device)
    logits = random_logits(6, 9, torch.float32, device)
    labels = torch.tensor([0, 3, 8, 3, 5, 1], device=device)
    kept = labels.cpu() != 3
    loss, _, _ = run_backend(logits, labels, 0.5, -1.0, "mean", backend, high_entropy_weight=0.25, ignore_index=3)
    ref = reference_ihl(logits, labels, 0.5, -1.0, 0.25, ignore_index=3)
    assert_close(loss, ref.loss[kept].mean(), 1e-5, 2e-6, "mean")
    with pytest.raises(ValueError, match="labels must be in"):
        inverted_hinge_loss(logits, torch.full((6,), IGNORE, device=device), 0.5, 1.0, ignore_index=3, backend=backend)


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_int32_labels_and_empty(device, backend):
    require_backend(backend, device)
    logits = random_logits(4, 10, torch.float32, device)
    labels = torch.tensor([1, 2, IGNORE, 9], device=device)
    loss64, entropy64 = inverted_hinge_loss(logits, labels, 2.0, 1.0, backend=backend)
    loss32, entropy32 = inverted_hinge_loss(logits, labels.int(), 2.0, 1.0, backend=backend)
    assert torch.equal(loss64, loss32) and torch.equal(entropy64, entropy32)
    empty_loss, empty_entropy = inverted_hinge_loss(
        logits[:0], labels[:0], 2.0, 1.0, reduction="none", backend=backend
    )
    assert empty_loss.shape == (0,) and empty_entropy.shape == (0,)
    mean_of_none, _ = inverted_hinge_loss(logits[:0], labels[:0], 2.0, 1.0, backend=backend)
    assert mean_of_none.item() == 0.0


@grid(device=DEVICES, backend=["triton", "cpp"])
def test_ihl_strided_rows_reach_kernels_without_copy(device, backend, monkeypatch):
    require_backend(backend, device)
    calls = spy_on_kernels(monkeypatch, ihl_module.IHL_KERNELS, backend)
    rows = random_logits(5, 40, torch.float32, device)[:, 3:33]
    inverted_hinge_loss(rows, torch.arange(5, device=device), 2.0, 1.0, backend=backend)
    assert [(args[0].data_ptr(), args[0].stride()) for args in calls["forward"]] == [(rows.data_ptr(), (40, 1))]


@grid(device=DEVICES, backend=["triton", "cpp"], dtype=[torch.float32, torch.bfloat16])
def test_ihl_forward_saves_first_runner_up(device, backend, dtype):
    """The kernel forward saves v* for the single-pass backward: the first maximum of the
    other logits, -1 for ignored tokens and where every other logit is -inf (bf16 ties)."""
    require_backend(backend, device)
    logits, labels = ihl_inputs(3000, dtype, device)
    # three-way tie, the target first, across the CPU kernel's 1024-logit chunks
    labels[0] = 40
    logits[0, [40, 1100, 2500]] = logits[0].max() + 1
    labels[5] = 7
    logits[5, [10, 2999]] = logits[5].max() + 1
    ref = reference_ihl(logits, labels, 2.0, 1.0, 0.0)
    assert ref.runner_up[[0, 1, 4, 5]].tolist() == [1100, -1, -1, 10]  # 1: ignored, 4: no other finite logit
    runner_up = ihl_module.IHL_KERNELS[backend].forward(logits, labels.long(), 2.0, 1.0, 0.0, IGNORE)[-1]
    assert runner_up.dtype == torch.int32
    assert runner_up.cpu().tolist() == ref.runner_up.tolist()


@grid(device=DEVICES, backend=["triton", "cpp"], vocab=[8192, 8197])
def test_ihl_runner_up_ties_across_lanes_and_blocks(device, backend, vocab):
    """Ties for v* in different lanes and blocks of the triton kernel (BLOCK_V 4096: lanes
    keep their own best, merged at the end), whole blocks only (8192) or with a tail (8197):
    the lowest column wins; loss and gradient match float64."""
    require_backend(backend, device)
    logits = random_logits(4, vocab, torch.float32, device)
    top = logits.max() + 1
    labels = torch.tensor([20, 4100, IGNORE, vocab - 1], device=device)
    logits[0, [20, 4097, 4000, 8191]] = top  # target tied too: v* = 4000 (block 0) beats lane 1 of block 1
    logits[1, [8191, 4100, 4099]] = top  # lane 3 of block 1 beats lane 4095 of block 1
    logits[2, [vocab - 1, 3, 4099]] = top  # ignored: no runner-up saved
    logits[3, [vocab - 1, vocab - 2]] = top  # the tail's last column is the target
    ref = reference_ihl(logits, labels, 2.0, 1e9, 0.0)
    assert ref.runner_up.tolist() == [4000, 4099, -1, vocab - 2]
    runner_up = ihl_module.IHL_KERNELS[backend].forward(logits, labels.long(), 2.0, 1e9, 0.0, IGNORE)[-1]
    assert runner_up.cpu().tolist() == ref.runner_up.tolist()
    loss, _, grad = run_backend(logits, labels, 2.0, 1e9, "none", backend)
    assert_close(loss, ref.loss * ref.weight, 1e-5, 2e-6, "loss")
    scale = ref.grad.abs().max()
    assert_close(grad.cpu() / scale, ref.grad / scale, 0, GRAD_TOL[torch.float32], "grad")


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_check_values_false_reads_no_device_value(device, backend, monkeypatch):
    """check_values=False: forward and backward read no device value on the host; a label
    outside [0, V) (never used as an index) and a row of all -inf give their tokens a NaN
    loss on every backend, the other tokens' losses and gradients are exact. The default
    still raises (and reads)."""
    require_backend(backend, device)
    logits = random_logits(4, 37, torch.float32, device)
    logits[2] = float("-inf")
    labels = torch.tensor([3, 37, 5, 36], device=device)  # 37: out of range
    leaf = logits.clone().requires_grad_()
    with monkeypatch.context() as patch:
        forbid_host_reads(patch)
        loss, _ = inverted_hinge_loss(leaf, labels, 2.0, 1e9, reduction="none", backend=backend, check_values=False)
        (grad,) = torch.autograd.grad(loss, leaf, torch.tensor([1.0, 0.0, 0.0, 1.0], device=device))
        total, _ = inverted_hinge_loss(logits, labels, 2.0, 1e9, backend=backend, check_values=False)
    assert torch.isnan(loss[[1, 2]]).all().item() and torch.isnan(total).item()
    kept = [0, 3]
    ref = reference_ihl(logits[kept], labels[kept], 2.0, 1e9, 0.0)
    assert_close(loss[kept], ref.loss * ref.weight, 1e-5, 2e-6, "finite tokens, unchecked")
    assert_close(grad[kept], ref.grad, 0, GRAD_TOL[torch.float32], "grad, unchecked")
    with pytest.raises(ValueError, match="labels must be in"):
        inverted_hinge_loss(logits, labels, 2.0, 1e9, backend=backend)
    with pytest.raises(ValueError, match="all -inf"):
        inverted_hinge_loss(logits[[2]], labels[[2]], 2.0, 1e9, backend=backend)
    with monkeypatch.context() as patch, pytest.raises(AssertionError, match="host read"):
        forbid_host_reads(patch)
        inverted_hinge_loss(logits[kept], labels[kept], 2.0, 1e9, backend=backend)


def test_ihl_eager_gradcheck():
    """Float64 autograd of the eager reference (no ties, thresholds far from the entropies)."""
    logits = torch.randn(5, 7, dtype=torch.float64)
    logits[2, :3] = float("-inf")
    logits.requires_grad_()
    labels = torch.tensor([0, 6, 4, IGNORE, 3])
    threshold = float(reference_entropy(logits.detach(), 2.0).median()) + 1e-3
    for reduction in REDUCTIONS:
        fn = lambda z: inverted_hinge_loss(  # noqa: E731
            z, labels, 2.0, threshold, high_entropy_weight=0.4, reduction=reduction, backend="eager"
        )[0]
        assert torch.autograd.gradcheck(fn, (logits,))


# ----------------------------------------------------------------------------- errors


@grid(device=DEVICES, backend=BACKENDS)
def test_ihl_all_masked_row(device, backend):
    """A row of all -inf logits is an error even when its token is ignored."""
    require_backend(backend, device)
    logits = torch.randn(3, 5, device=device)
    logits[2] = float("-inf")
    for last_label in (2, IGNORE):
        labels = torch.tensor([0, 1, last_label], device=device)
        with pytest.raises(ValueError, match="all -inf"):
            inverted_hinge_loss(logits, labels, 2.0, 1.0, backend=backend)


def test_ihl_bad_input():
    logits, labels = torch.randn(4, 6), torch.tensor([0, 5, IGNORE, 2])
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        inverted_hinge_loss(logits[None], labels, 2.0, 1.0)
    with pytest.raises(TypeError, match="logits must have dtype"):
        inverted_hinge_loss(logits.long(), labels, 2.0, 1.0)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        inverted_hinge_loss(torch.randn(4, 0), labels, 2.0, 1.0)
    with pytest.raises(TypeError, match="labels must have dtype"):
        inverted_hinge_loss(logits, labels.float(), 2.0, 1.0)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        inverted_hinge_loss(logits, [0, 1, 2, 3], 2.0, 1.0)
    with pytest.raises(ValueError, match=r"labels must have shape \[T\]"):
        inverted_hinge_loss(logits, labels[:3], 2.0, 1.0)
    with pytest.raises(ValueError, match=r"labels must have shape \[T\]"):
        inverted_hinge_loss(logits, labels[:, None], 2.0, 1.0)
    for bad in (6, -1):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 6\)"):
            inverted_hinge_loss(logits, torch.tensor([0, bad, IGNORE, 2]), 2.0, 1.0)
    with pytest.raises(ValueError, match="q must be a finite number > 0"):
        inverted_hinge_loss(logits, labels, 0.0, 1.0)
    with pytest.raises(ValueError, match="q must be a finite number > 0"):
        inverted_hinge_loss(logits, labels, -2.0, 1.0)
    with pytest.raises(TypeError, match="threshold must be a number"):
        inverted_hinge_loss(logits, labels, 2.0, None)
    with pytest.raises(ValueError, match="high_entropy_weight must be >= 0"):
        inverted_hinge_loss(logits, labels, 2.0, 1.0, high_entropy_weight=-0.5)
    with pytest.raises(ValueError, match="high_entropy_weight must be finite, got inf"):
        inverted_hinge_loss(logits, labels, 2.0, 1.0, high_entropy_weight=float("inf"))
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        inverted_hinge_loss(logits, labels, 2.0, float("nan"))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        inverted_hinge_loss(logits, labels, 2.0, 1.0, ignore_index=-100.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        inverted_hinge_loss(logits, labels, 2.0, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="one device"):
        inverted_hinge_loss(logits, labels.to("meta"), 2.0, 1.0)


def test_ihl_kernels_compile_for_hopper():
    """The interpreter never lowers the kernels: compile them for sm_90 with the launch
    config of a Llama-3 vocabulary (BLOCK_V 4096, 8 warps), each logits dtype; on a GPU
    every exp is one ex2.approx.ftz."""
    config = ihl_module.row_kernel_config(128256)
    num_warps, block_v = config["num_warps"], config["BLOCK_V"]
    specs = []
    for data in ("bf16", "fp16", "fp32"):
        signature = {
            "logits_ptr": "*" + data, "grad_logits_ptr": "*" + data, "labels_ptr": "*i64",
            "loss_ptr": "*fp32", "entropy_ptr": "*fp32", "weight_ptr": "*fp32", "row_max_ptr": "*fp32",
            "log_sum_ptr": "*fp32",
            "runner_up_ptr": "*i32", "grad_loss_ptr": "*fp32", "power_sum_ptr": "*fp32",
            "q": "fp32", "threshold": "fp32", "high_entropy_weight": "fp32",
        }
        for shannon, power_sum in ((False, False), (True, False), (False, True)):  # P_q stored: token_losses
            specs.append(dict(module="alter_kernels.ihl", kernel="_ihl_forward_kernel", signature=signature,
                              constexprs={"BLOCK_V": block_v, "SHANNON": shannon, "STORE_POWER_SUM": power_sum},
                              num_warps=num_warps, ptx_contains="ex2.approx.ftz.f32"))
        specs.append(dict(module="alter_kernels.ihl", kernel="_ihl_backward_kernel", signature=signature,
                          constexprs={"BLOCK_V": block_v}, num_warps=num_warps, ptx_contains="ex2.approx.ftz.f32"))
    assert_compiles_for_hopper(specs)
