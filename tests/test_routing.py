"""route and moe_align: every backend against plain float64 / loop computations written here."""
import math

import pytest
import torch

from alter_kernels import BackendUnavailable, moe_align, route
from alter_kernels.routing import route_launch_config, route_eager
from _reference import assert_compiles_for_hopper, reference_moe_align, reference_route, reference_route_grad
from conftest import require_backend
from conftest import test_devices as devices_under_test  # renamed: pytest would collect test_*

DEVICES = devices_under_test()
ROUTE_BACKENDS = ["eager", "triton"]
THRESHOLD = 1.25  # exactly representable, so tokens placed exactly at it test the strict ">"
TAU_HIGH, TAU_LOW = 0.8, 0.01
K_PAIRS = [(3, 1), (2, 2), (1, 1), (4, 1)]
# (N, k_high, k_low) with k_high <= N
ROUTE_SHAPES = [(n, kh, kl) for n in (2, 5, 8, 64) for kh, kl in K_PAIRS if kh <= n]


# ----------------------------------------------------------------------------- helpers


def random_route_inputs(num_tokens, num_experts, dtype, device):
    """Non-contiguous logits (a strided view of a transposed tensor) with a few -inf, and
    entropies on both sides of THRESHOLD, some exactly at it."""
    base = torch.randn(num_experts, 2 * num_tokens, device=device).to(dtype)
    logits = base.t()[::2]
    assert not logits.is_contiguous()
    logits[1, 0] = float("-inf")
    logits[num_tokens // 2, num_experts - 1] = float("-inf")
    entropy = torch.rand(num_tokens, device=device) * 2 * THRESHOLD
    entropy[::7] = THRESHOLD  # exactly at the threshold: low entropy
    return logits, entropy


def spaced_logits(num_tokens, num_experts, spacing, dtype=torch.float64):
    """Logits whose values in a row are at least ``spacing`` apart (no near-ties), so
    finite differences do not cross a selection boundary."""
    ranks = torch.stack([torch.randperm(num_experts) for _ in range(num_tokens)]).to(dtype)
    return ranks * spacing + torch.rand(num_tokens, num_experts, dtype=dtype) * (spacing / 4)


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_experts,k_high,k_low", ROUTE_SHAPES)
def test_route_matches_float64_reference(device, backend, dtype, num_experts, k_high, k_low):
    require_backend(backend, device)
    num_tokens = 37
    logits, entropy = random_route_inputs(num_tokens, num_experts, dtype, device)
    weights, experts = route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, k_high, k_low, backend=backend)
    ref_w, ref_e = reference_route(logits.cpu(), entropy.cpu(), THRESHOLD, TAU_HIGH, TAU_LOW, k_high, k_low)

    assert weights.dtype == torch.float32 and experts.dtype == torch.int32
    assert weights.shape == experts.shape == (num_tokens, max(k_high, k_low))
    # the kernels select in fp32: fp16/bf16 logits are exact there, so the selection (and its
    # ties) must match exactly; fp64 randn logits have no pair that rounds to one fp32 value
    assert torch.equal(experts.cpu().long(), ref_e)
    # fp32 softmax: the exponent (l - l_max)/tau carries a few fp32 ulps of |l - l_max|/tau
    torch.testing.assert_close(weights.cpu().double(), ref_w, atol=1e-5, rtol=1e-5)
    unused = experts == -1
    assert bool((weights[unused] == 0).all())
    torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(num_tokens), atol=1e-6, rtol=0)  # fp32 rounding
    assert int(unused.sum()) > 0 or k_high == k_low  # low tokens with k_low < k_high leave slots unused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_experts,k_high,k_low", [(5, 3, 1), (8, 2, 2), (64, 4, 1)])
def test_route_gradient_matches_float64_reference(device, backend, dtype, num_experts, k_high, k_low):
    require_backend(backend, device)
    num_tokens = 37
    logits, entropy = random_route_inputs(num_tokens, num_experts, dtype, device)
    logits.requires_grad_(True)
    entropy.requires_grad_(True)
    tau_low = 0.3  # so that low tokens with k_low = 2 have gradients well above zero
    weights, experts = route(logits, entropy, THRESHOLD, TAU_HIGH, tau_low, k_high, k_low, backend=backend)
    # a non-contiguous upstream gradient
    grad_weights = torch.randn(weights.shape[1], num_tokens, device=device).t()
    grad_logits, grad_entropy = torch.autograd.grad(weights, (logits, entropy), grad_weights, allow_unused=True)
    assert grad_entropy is None  # the selection is piecewise constant in the entropy

    logits_cpu, entropy_cpu = logits.detach().cpu(), entropy.detach().cpu()
    ref_w, ref_e = reference_route(logits_cpu, entropy_cpu, THRESHOLD, TAU_HIGH, tau_low, k_high, k_low)
    ref_grad = reference_route_grad(
        ref_w, ref_e, entropy_cpu, THRESHOLD, TAU_HIGH, tau_low, grad_weights.cpu(), num_experts
    )
    assert grad_logits.dtype == dtype and grad_logits.shape == logits.shape
    # fp32 computation (atol/rtol 1e-5); fp16/bf16 gradients are rounded once when stored
    # (and the interpreter truncates bf16): one ulp of the stored dtype
    ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(grad_logits.cpu().double(), ref_grad, atol=1e-5, rtol=max(1e-5, ulp))
    assert bool((ref_grad != 0).any())


@pytest.mark.parametrize("tau_low", [0.5, 0.01])
def test_route_eager_gradcheck(tau_low):
    entropy = torch.tensor([0.3, 2.0, 1.0, 1.5, 0.1, 3.0], dtype=torch.float64)
    logits = spaced_logits(entropy.numel(), 7, spacing=0.3).requires_grad_(True)

    def weights_of(lg):
        return route_eager(lg, entropy, THRESHOLD, TAU_HIGH, tau_low, 3, 2)[0]

    assert weights_of(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(weights_of, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_minus_inf_logits_are_never_kept(device, backend):
    require_backend(backend, device)
    inf = float("inf")
    logits = torch.tensor(
        [
            [-inf, -inf, -inf, -inf],  # no expert available: every slot unused
            [-inf, 0.5, -inf, -inf],  # fewer finite logits than k_high
            [2.0, -inf, 1.0, 3.0],
        ],
        device=device,
        requires_grad=True,
    )
    entropy = torch.tensor([2.0, 2.0, 2.0], device=device)  # all high: k_high = 3
    weights, experts = route(logits, entropy, THRESHOLD, 1.0, TAU_LOW, 3, 1, backend=backend)
    ref_w, ref_e = reference_route(logits.detach().cpu(), entropy.cpu(), THRESHOLD, 1.0, TAU_LOW, 3, 1)
    assert experts.cpu().tolist() == [[-1, -1, -1], [1, -1, -1], [3, 0, 2]]
    assert torch.equal(experts.cpu().long(), ref_e)
    torch.testing.assert_close(weights.detach().cpu().double(), ref_w, atol=1e-6, rtol=1e-6)  # fp32 softmax
    (grad,) = torch.autograd.grad(weights, logits, torch.randn_like(weights))
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[:2] == 0).all())  # a lone kept expert has weight 1 whatever its logit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_route_rejects_nan_and_plus_inf_logits(device, backend, bad):
    """NaN / +inf router logits are a ValueError on every backend (before: eager dropped a
    NaN row, triton picked an expert); -inf still means "expert unavailable"."""
    require_backend(backend, device)
    logits, entropy = random_route_inputs(7, 5, torch.float32, device)
    route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1, backend=backend)  # holds -inf: fine
    logits[4, 2] = bad
    with pytest.raises(ValueError, match=rf"route: router_logits\[4, 2\] = {bad}.*-inf marks an unavailable expert"):
        route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1, backend=backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_unchecked_nan_and_plus_inf_rows_agree_across_backends(device, dtype):
    """check_finite=False (the layers' sync-free path): every backend ranks NaN as +inf
    (lowest index first among them) and gives such a row NaN in every weight, so it reaches
    the layer output instead of being dropped; other rows are routed as usual."""
    require_backend("triton", device)
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(6, 5, dtype=torch.float64).to(device=device, dtype=dtype)
    logits[1, 3] = nan
    logits[2, [0, 4]] = torch.tensor([inf, nan], dtype=dtype)
    logits[3] = nan
    logits[4, 1] = -inf
    entropy = torch.tensor([2.0, 2.0, 2.0, 0.5, 2.0, 0.5], device=device)
    results = {
        backend: route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1, backend=backend, check_finite=False)
        for backend in ROUTE_BACKENDS
    }
    (w_eager, e_eager), (w_triton, e_triton) = results["eager"], results["triton"]
    assert torch.equal(e_eager, e_triton)
    assert e_eager[1, 0] == 3 and e_eager[2, :2].tolist() == [0, 4] and e_eager[3].tolist() == [0, -1, -1]
    bad = torch.tensor([False, True, True, True, False, False], device=device)
    assert bool(w_eager[bad].isnan().all()) and bool(w_triton[bad].isnan().all())
    good = route(logits[~bad], entropy[~bad], THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1, backend="eager")
    for weights, experts in results.values():
        assert torch.equal(experts[~bad], good[1])
        torch.testing.assert_close(weights[~bad], good[0], rtol=1e-6, atol=1e-6)  # fp32 softmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_large_logits_at_low_temperature_do_not_overflow(device, backend):
    require_backend(backend, device)
    num_tokens = 19
    logits = torch.randn(num_tokens, 6, device=device) * 300  # /0.01 would overflow exp in fp32 and fp64
    entropy = torch.rand(num_tokens, device=device) * 2 * THRESHOLD
    weights, experts = route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 2, backend=backend)
    ref_w, ref_e = reference_route(logits.cpu(), entropy.cpu(), THRESHOLD, TAU_HIGH, TAU_LOW, 3, 2)
    assert bool(torch.isfinite(weights).all())
    assert torch.equal(experts.cpu().long(), ref_e)
    # fp32: the exponent (l - l_max)/tau carries a few ulps of values up to ~1e5
    torch.testing.assert_close(weights.cpu().double(), ref_w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_threshold_at_infinity_routes_every_token_alike(device, backend):
    require_backend(backend, device)
    logits = torch.randn(11, 5, device=device)
    entropy = torch.rand(11, device=device) * 3
    _, experts_low = route(logits, entropy, math.inf, TAU_HIGH, TAU_LOW, 3, 1, backend=backend)
    _, experts_high = route(logits, entropy, -math.inf, TAU_HIGH, TAU_LOW, 3, 1, backend=backend)
    assert bool((experts_low[:, 1:] == -1).all()) and bool((experts_low[:, 0] >= 0).all())
    assert bool((experts_high >= 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_empty_batch(device, backend):
    require_backend(backend, device)
    logits = torch.randn(0, 4, device=device, requires_grad=True)
    entropy = torch.rand(0, device=device)
    weights, experts = route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1, backend=backend)
    assert weights.shape == experts.shape == (0, 3)
    (grad,) = torch.autograd.grad(weights.sum(), logits)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_route_automatic_backend_handles_more_experts_than_the_triton_tile(device):
    logits, entropy = random_route_inputs(9, 100, torch.float32, device)
    weights, experts = route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1)  # triton on CUDA falls back
    ref_w, ref_e = reference_route(logits.cpu(), entropy.cpu(), THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1)
    assert torch.equal(experts.cpu().long(), ref_e)
    torch.testing.assert_close(weights.cpu().double(), ref_w, atol=1e-5, rtol=1e-5)  # fp32 softmax


@pytest.mark.parametrize("device", DEVICES)
def test_route_triton_rejects_more_than_64_experts(device):
    require_backend("triton", device)
    logits, entropy = random_route_inputs(9, 65, torch.float32, device)
    with pytest.raises(ValueError, match=r"at most 64 experts \(router_logits.shape\[1\]\), got 65"):
        route(logits, entropy, THRESHOLD, TAU_HIGH, TAU_LOW, 3, 1, backend="triton")


def _route_args(**changes):
    args = dict(
        router_logits=torch.randn(6, 5),
        entropy=torch.rand(6),
        threshold=THRESHOLD,
        tau_high=TAU_HIGH,
        tau_low=TAU_LOW,
        k_high=3,
        k_low=1,
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(router_logits=[[0.0, 1.0]]), TypeError, "router_logits must be a torch.Tensor"),
        (dict(router_logits=torch.randn(6, 5, 1)), ValueError, "router_logits must have 2 dimensions"),
        (dict(router_logits=torch.randint(0, 3, (6, 5))), TypeError, "router_logits must have dtype"),
        (dict(entropy=torch.rand(6, 1)), ValueError, "entropy must have 1 dimensions"),
        (dict(entropy=torch.rand(7)), ValueError, r"entropy must have shape \[T\] = \[6\]"),
        (dict(entropy=torch.ones(6, dtype=torch.int32)), TypeError, "entropy must have dtype"),
        (dict(entropy=torch.rand(6, device="meta")), ValueError, "all tensors must be on one device"),
        (dict(threshold=float("nan")), ValueError, "threshold must not be NaN"),
        (dict(threshold="1.2"), TypeError, "threshold must be a real number"),
        (dict(tau_high=0.0), ValueError, "tau_high must be a finite number > 0"),
        (dict(tau_low=-0.01), ValueError, "tau_low must be a finite number > 0"),
        (dict(tau_low=math.inf), ValueError, "tau_low must be a finite number > 0"),
        (dict(k_high=6), ValueError, r"k_high must be in \[1, 5\]"),
        (dict(k_high=0, k_low=0), ValueError, r"k_high must be in \[1, 5\]"),
        (dict(k_low=0), ValueError, r"k_low must be in \[1, 3\]"),
        (dict(k_high=2, k_low=3), ValueError, r"k_low must be in \[1, 2\]"),
        (dict(k_high=2.0), TypeError, "k_high must be an int"),
        (dict(k_low=True), TypeError, "k_low must be an int"),
        (dict(router_logits=torch.randn(6, 80), k_high=65), ValueError, r"k_high must be in \[1, 64\]"),
    ],
)
def test_route_rejects_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        route(**_route_args(**changes))


def test_route_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        route(**_route_args(), backend="fast")
    with pytest.raises(BackendUnavailable, match="route: has no 'cpp' backend"):
        route(**_route_args(), backend="cpp")


# ------------------------------------------------------------------------- moe_align


def random_experts(num_tokens, num_slots, num_experts, device):
    """Distinct experts per token drawn from the even ids only (odd ones get no token),
    with a random number (0 to all) of trailing -1 slots; token 0 uses none."""
    used = torch.arange(0, num_experts, 2)
    picks = torch.stack([used[torch.randperm(used.numel())[:num_slots]] for _ in range(num_tokens)])
    kept = torch.randint(0, num_slots + 1, (num_tokens, 1))
    kept[0] = 0
    picks[torch.arange(num_slots)[None, :] >= kept] = -1
    return picks.to(torch.int32).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize("num_tokens,num_slots,num_experts", [(37, 3, 8), (5, 1, 3), (50, 3, 7)])
def test_moe_align_matches_loop_reference(device, backend, block_m, num_tokens, num_slots, num_experts):
    require_backend(backend, device)
    experts = random_experts(num_tokens, num_slots, num_experts, device)
    assert bool((experts == -1).any())
    sorted_ids, block_expert, num_padded = moe_align(experts, num_experts, block_m, backend=backend)
    ref_ids, ref_blocks, ref_padded = reference_moe_align(experts.cpu(), num_experts, block_m)
    for out in (sorted_ids, block_expert, num_padded):
        assert out.dtype == torch.int32 and out.device == experts.device
    assert sorted_ids.cpu().tolist() == ref_ids
    assert block_expert.cpu().tolist() == ref_blocks
    assert num_padded.cpu().tolist() == [ref_padded]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_moe_align_cpp_equals_eager(device, block_m):
    require_backend("cpp", device)
    experts = random_experts(129, 4, 12, device)
    experts_t = random_experts(4, 33, 70, device).t()  # non-contiguous
    for ex, n in ((experts, 12), (experts_t, 70)):
        eager = moe_align(ex, n, block_m, backend="eager")
        cpp = moe_align(ex, n, block_m, backend="cpp")
        for a, b in zip(eager, cpp):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_moe_align_edge_cases(device, backend):
    require_backend(backend, device)
    # non-contiguous input, and every slot unused
    experts = torch.tensor([[2, 0, 1], [-1, 2, -1]], dtype=torch.int32, device=device).t()
    for ex in (experts, torch.full((3, 2), -1, dtype=torch.int32, device=device), experts[:0]):
        sorted_ids, block_expert, num_padded = moe_align(ex, 3, 4, backend=backend)
        ref_ids, ref_blocks, ref_padded = reference_moe_align(ex.cpu(), 3, 4)
        assert sorted_ids.cpu().tolist() == ref_ids
        assert block_expert.cpu().tolist() == ref_blocks
        assert num_padded.cpu().tolist() == [ref_padded]


@pytest.mark.parametrize(
    "experts,num_experts,block_m,error,match",
    [
        ([[0, 1]], 2, 4, TypeError, "experts must be a torch.Tensor"),
        (torch.zeros(2, 2, dtype=torch.int64), 2, 4, TypeError, "experts must have dtype in \\(int32\\)"),
        (torch.zeros(4, dtype=torch.int32), 2, 4, ValueError, "experts must have 2 dimensions"),
        (torch.tensor([[0, 5]], dtype=torch.int32), 5, 4, ValueError, r"expert id 5, outside \[-1, num_experts\)"),
        (torch.tensor([[0, -2]], dtype=torch.int32), 5, 4, ValueError, "expert id -2"),
        (torch.zeros(2, 2, dtype=torch.int32), 0, 4, ValueError, "num_experts must be >= 1"),
        (torch.zeros(2, 2, dtype=torch.int32), 2, 0, ValueError, "block_m must be >= 1"),
        (torch.zeros(2, 2, dtype=torch.int32), 2.0, 4, TypeError, "num_experts must be an int"),
    ],
)
def test_moe_align_rejects_bad_input(experts, num_experts, block_m, error, match):
    with pytest.raises(error, match=match):
        moe_align(experts, num_experts, block_m)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("num_tokens,num_experts,block_m", [(2, 2, 2**30), (2**20, 2**11, 2**20)])
def test_moe_align_rejects_sizes_past_int32(backend, num_tokens, num_experts, block_m):
    """Padded sizes past int32 are the same ValueError on every backend, before any
    allocation (eager used to allocate 8 GiB and more where cpp raised)."""
    require_backend(backend, "cpu")
    experts = torch.zeros(num_tokens, 2, dtype=torch.int32).expand(num_tokens, 2)
    max_padded = num_tokens * 2 + num_experts * (block_m - 1)
    match = rf"moe_align: T\*K \+ num_experts\*\(block_m - 1\) = {max_padded} does not fit in int32"
    with pytest.raises(ValueError, match=match):
        moe_align(experts, num_experts, block_m, backend=backend)


def test_route_kernels_compile_for_hopper():
    """The interpreter never lowers the kernels: compile them for sm_90 with their launch
    configs (from 2 to 64 experts, 1 to 4 slots), each logits dtype."""
    specs = []
    for data in ("bf16", "fp16", "fp32"):
        signature = {
            "logits_ptr": "*" + data, "grad_logits_ptr": "*" + data, "entropy_ptr": "*fp32",
            "weights_ptr": "*fp32", "grad_weights_ptr": "*fp32", "experts_ptr": "*i32",
            "threshold": "fp32", "inv_tau_high": "fp32", "inv_tau_low": "fp32",
        }
        for num_experts, num_slots in ((2, 1), (8, 3), (64, 4)):
            meta, _ = route_launch_config(8192, num_experts, num_slots)
            num_warps = meta.pop("num_warps")
            for kernel in ("_route_forward_kernel", "_route_backward_kernel"):
                specs.append(dict(module="alter_kernels.routing", kernel=kernel, signature=signature,
                                  constexprs=dict(meta, NUM_SLOTS=num_slots), num_warps=num_warps))
    assert_compiles_for_hopper(specs)
