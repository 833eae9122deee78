"""asym_lora: every backend against a plain float64 per-token loop, forward and gradients."""
import importlib
from dataclasses import dataclass

import conftest
import pytest
import torch

from alter_kernels import BackendUnavailable, asym_lora, route
from alter_kernels.asym_lora import asym_lora_eager, asym_lora_eager_dense
from alter_kernels.routing import route_eager
from _reference import assert_compiles_for_hopper

DEVICES = conftest.test_devices()


def reference(x, A, B, weights, experts, scaling, a_grad_mask, grad_out):
    """delta and the gradients (x, A, B, weights) of <delta, grad_out>, token by token in
    float64, written from the formulas (no autograd)."""
    x, A, B, weights, grad_out = (t.detach().cpu().double() for t in (x, A, B, weights, grad_out))
    experts = experts.cpu()
    T, K = experts.shape
    delta = torch.zeros(T, B.shape[1], dtype=torch.float64)
    grad_x, grad_A, grad_B = torch.zeros_like(x), torch.zeros_like(A), torch.zeros_like(B)
    grad_weights = torch.zeros(T, K, dtype=torch.float64)
    for t in range(T):
        h = A @ x[t]
        grad_h = torch.zeros_like(h)
        g = grad_out[t]
        for j in range(K):
            e = int(experts[t, j])
            if e < 0:
                continue
            gate = scaling * weights[t, j]
            delta[t] += gate * (B[e] @ h)
            grad_h += gate * (B[e].t() @ g)
            grad_B[e] += gate * torch.outer(g, h)
            grad_weights[t, j] = scaling * (g @ (B[e] @ h))
        grad_x[t] = A.t() @ grad_h
        if a_grad_mask is None or bool(a_grad_mask[t]):
            grad_A += torch.outer(grad_h, x[t])
    return delta, grad_x, grad_A, grad_B, grad_weights


@dataclass
class Case:
    name: str
    T: int
    k: int
    d: int
    r: int
    N: int
    K: int
    routes: str  # "random" | "forced" | "sparse"
    masked: bool


CASES = [
    # random experts in [-1, N): unused slots, duplicate experts in one token, empty rows
    Case("random", T=37, k=20, d=23, r=3, N=5, K=3, routes="random", masked=True),
    # forced routes: K = 1, weight 1, one expert per sample of 8 tokens
    Case("forced", T=53, k=33, d=47, r=8, N=2, K=1, routes="forced", masked=False),
    # only experts 1 and 3 of 5 used (0, 2, 4 get no token), about half the slots unused
    Case("sparse", T=29, k=17, d=40, r=16, N=5, K=2, routes="sparse", masked=True),
]


def make_routes(case: Case, device):
    T, K, N = case.T, case.K, case.N
    if case.routes == "forced":
        experts = (torch.arange(T) // 8 % N).to(torch.int32)[:, None]
        weights = torch.ones(T, 1)
    else:
        if case.routes == "random":
            experts = torch.randint(-1, N, (T, K), dtype=torch.int32)
            experts[3] = -1  # a token with no expert at all
        else:
            experts = torch.tensor([1, 3], dtype=torch.int32)[torch.randint(0, 2, (T, K))]
            experts[torch.rand(T, K) < 0.5] = -1
        # the weights of unused slots are garbage on purpose: the op must ignore them
        weights = torch.rand(T, K) + 0.1
    return weights.to(device), experts.to(device)


def make_inputs(case: Case, dtype, device):
    """Fresh random inputs; x, B and grad_out are non-contiguous views."""
    x = torch.randn(case.k, case.T, device=device).t().to(dtype)
    A = (torch.randn(case.r, case.k, device=device) / case.k**0.5).to(dtype)
    B = torch.randn(case.N, case.r, case.d, device=device).transpose(1, 2).to(dtype)
    weights, experts = make_routes(case, device)
    mask = (torch.rand(case.T, device=device) < 0.6) if case.masked else None
    grad_out = torch.randn(case.d, case.T, device=device).t().to(dtype)
    assert not x.is_contiguous() and not B.is_contiguous() and not grad_out.is_contiguous()
    return x, A, B, weights, experts, mask, grad_out


def run(impl, x, A, B, weights, experts, scaling, mask, grad_out, base=None):
    """(delta, dx, dA, dB, dw) of <delta, grad_out>; with ``base``, the output is
    accumulated into a copy of base (``out=``), and its gradient must be grad_out."""
    x, A, B, weights = (t.detach().requires_grad_() for t in (x, A, B, weights))
    if impl == "eager_dense":
        delta = asym_lora_eager_dense(x, A, B, weights, experts, scaling, mask)
    elif base is None:
        delta = asym_lora(x, A, B, weights, experts, scaling, mask, backend=impl)
    else:
        leaf = base.detach().requires_grad_()
        out = leaf * 1  # a non-leaf the op may write into, as a base layer's output
        delta = asym_lora(x, A, B, weights, experts, scaling, mask, backend=impl, out=out)
        assert delta is out
        grads = torch.autograd.grad(delta, (x, A, B, weights, leaf), grad_out)
        torch.testing.assert_close(grads[-1], grad_out, rtol=0, atol=0)
        return (delta, *grads[:-1])
    grads = torch.autograd.grad(delta, (x, A, B, weights), grad_out)
    return (delta, *grads)


# Relative to the largest reference value of each output (measured worst over seeds and
# cases: float32 3e-7, float16 1e-3, bfloat16 8e-3). float32: summation order only.
# float16 / bfloat16: h = x A^T, the output and the half matmuls of the eager path round
# to 2^-11 / 2^-8 (and the interpreter truncates bf16 stores): about 4 ulps of headroom.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NAMES = ("delta", "grad_x", "grad_A", "grad_B", "grad_weights")


def assert_matches_reference(got, expected, dtype, weights_dtype=torch.float32):
    tol = TOLERANCE[dtype]
    for name, value, want in zip(NAMES, got, expected):
        assert value.dtype == (weights_dtype if name == "grad_weights" else dtype), name
        scale = want.abs().max().item()
        assert scale > 0, f"{name}: the reference is all zeros; the test would be vacuous"
        torch.testing.assert_close(
            value.detach().cpu().double(), want, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "eager_dense", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_float64_reference(case, dtype, impl, device):
    if impl == "triton":
        conftest.require_backend("triton", device)
    x, A, B, weights, experts, mask, grad_out = make_inputs(case, dtype, device)
    scaling = 1.7
    got = run(impl, x, A, B, weights, experts, scaling, mask, grad_out)
    assert_matches_reference(got, reference(x, A, B, weights, experts, scaling, mask, grad_out), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_accumulates_into_out(case, dtype, impl, device):
    """out= (the base layer's output): out + delta written in place, the same gradients
    (and grad_out to out), against the float64 reference; a dense random, non-contiguous
    upstream gradient."""
    conftest.require_backend(impl, device)
    x, A, B, weights, experts, mask, grad_out = make_inputs(case, dtype, device)
    if dtype == torch.float64:  # float64 gate weights: every output checked at float64 precision
        weights = weights.double()
    base = torch.randn(case.T, case.d, device=device).to(dtype)
    got = run(impl, x, A, B, weights, experts, 1.7, mask, grad_out, base)
    want = reference(x, A, B, weights, experts, 1.7, mask, grad_out)
    want = (want[0] + base.double().cpu(), *want[1:])
    assert_matches_reference(got, want, dtype, weights_dtype=weights.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_out_of_any_leading_shape_is_written_in_place(impl, device):
    """out may be [..., d] (a layer's [batch, seq, d] output): written in place, returned."""
    conftest.require_backend(impl, device)
    case = CASES[1]
    x, A, B, weights, experts, _, _ = make_inputs(case, torch.float32, device)
    out = torch.randn(1, case.T, case.d, device=device)
    expected = out[0] + asym_lora(x, A, B, weights, experts, 0.9, backend=impl)
    pointer = out.data_ptr()
    got = asym_lora(x, A, B, weights, experts, 0.9, backend=impl, out=out)
    assert got is out and got.data_ptr() == pointer and got.shape == (1, case.T, case.d)
    torch.testing.assert_close(got[0], expected, rtol=1e-6, atol=1e-6)  # float32 rounding of one add


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_float64_matches_reference(case, weights_dtype, device):
    """The triton kernels keep float64 end to end (scaling included), with float32 or
    float64 gate weights."""
    conftest.require_backend("triton", device)
    x, A, B, weights, experts, mask, grad_out = make_inputs(case, torch.float64, device)
    weights = weights.to(weights_dtype)
    scaling = 0.37  # not a power of two: a float32 scaling would show
    got = run("triton", x, A, B, weights, experts, scaling, mask, grad_out)
    want = reference(x, A, B, weights, experts, scaling, mask, grad_out)
    if weights_dtype == torch.float64:
        assert_matches_reference(got, want, torch.float64, weights_dtype=torch.float64)
        return
    # grad_weights is float32 (the dtype of weights): compare it at float32 precision
    assert_matches_reference(got[:4], want[:4], torch.float64)
    assert got[4].dtype == torch.float32
    torch.testing.assert_close(got[4].double(), want[4], atol=1e-6 * want[4].abs().max().item(), rtol=1e-6)


# Shapes for the GPU tile sizes: T and d not multiples of the output tiles, N·r = 64 (the
# Llama shapes: one K step) and N·r = 320 > 128 (K in steps), rank 64.
GPU_TILE_CASES = [
    Case("gpu_tiles", T=300, k=40, d=150, r=8, N=8, K=3, routes="random", masked=True),
    Case("gpu_tiles_r64", T=90, k=24, d=131, r=64, N=5, K=2, routes="sparse", masked=True),
]


def _gpu_tile_rows():
    kernels = importlib.import_module("alter_kernels.asym_lora")
    return sorted({row[2:] for key in (90, 80, "wide") for row in kernels.EXPAND_TILES[key]})


@pytest.mark.parametrize("tiles", _gpu_tile_rows(), ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("case, accumulate", [(GPU_TILE_CASES[0], True), (GPU_TILE_CASES[1], False)],
                         ids=["gpu_tiles_into_out", "r64"])
def test_triton_gpu_tile_sizes_in_the_interpreter(case, accumulate, tiles, monkeypatch):
    """The interpreter runs smaller tiles than a GPU (EXPAND_TILES); here the kernel runs
    with every tile row of the GPU tables (float32 tiles, which the interpreter computes
    exactly), so the masks and offsets of the configurations users get are checked on
    the CPU too."""
    if "cpu" not in DEVICES:
        pytest.skip("a GPU run uses the GPU tile sizes in test_matches_float64_reference")
    conftest.require_backend("triton", "cpu")
    kernels = importlib.import_module("alter_kernels.asym_lora")
    monkeypatch.setitem(kernels.EXPAND_TILES, "interpret", ((None, None, *tiles),))
    meta = kernels.expand_config(torch.device("cpu"), torch.float32, case.T, case.d, case.N * case.r)
    assert (meta["BLOCK_M"], meta["num_warps"]) == (tiles[0], tiles[3])
    x, A, B, weights, experts, mask, grad_out = make_inputs(case, torch.float32, "cpu")
    base = torch.randn(case.T, case.d) if accumulate else None
    got = run("triton", x, A, B, weights, experts, 1.3, mask, grad_out, base)
    want = reference(x, A, B, weights, experts, 1.3, mask, grad_out)
    if accumulate:
        want = (want[0] + base.double(), *want[1:])
    assert_matches_reference(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_empty_batch(impl, device):
    conftest.require_backend(impl, device)
    x = torch.randn(0, 6, device=device, requires_grad=True)
    A = torch.randn(4, 6, device=device, requires_grad=True)
    B = torch.randn(3, 5, 4, device=device, requires_grad=True)
    weights = torch.zeros(0, 2, device=device)
    experts = torch.zeros(0, 2, dtype=torch.int32, device=device)
    delta = asym_lora(x, A, B, weights, experts, 2.0, backend=impl)
    assert delta.shape == (0, 5)
    delta.sum().backward()
    assert not A.grad.any() and not B.grad.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_a_grad_mask_blocks_masked_out_tokens(impl, device):
    """dA comes only from masked-in tokens: changing the other tokens' x leaves it
    unchanged, changing a masked-in token's x changes it; dx flows for every token."""
    conftest.require_backend(impl, device)
    case = CASES[0]
    x, A, B, weights, experts, mask, grad_out = make_inputs(case, torch.float32, device)
    experts[:, 0] = 2  # every token uses an expert, so every token has a nonzero dh
    base = run(impl, x, A, B, weights, experts, 1.0, mask, grad_out)
    x_out = torch.where(mask[:, None], x, torch.randn_like(x))
    changed_out = run(impl, x_out, A, B, weights, experts, 1.0, mask, grad_out)
    torch.testing.assert_close(changed_out[2], base[2], rtol=1e-5, atol=1e-6)  # float32 summation order
    x_in = torch.where(mask[:, None], torch.randn_like(x), x)
    changed_in = run(impl, x_in, A, B, weights, experts, 1.0, mask, grad_out)
    assert (changed_in[2] - base[2]).abs().max() > 1e-2
    assert base[1][~mask].abs().amax(dim=1).min() > 0  # masked-out tokens still get dx
    none_masked = run(impl, x, A, B, weights, experts, 1.0, torch.zeros_like(mask), grad_out)
    assert not none_masked[2].any()


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backward_has_no_host_sync(device):
    """The backward re-validates nothing (the forward checked the routes) and groups the
    slots with the compiled moe_align on the GPU: no device-to-host sync per layer."""
    if device != "cuda":
        pytest.skip("host syncs exist only with a GPU")
    conftest.require_backend("triton", device)
    conftest.require_backend("cpp", device)
    x, A, B, weights, experts, mask, grad_out = make_inputs(CASES[0], torch.bfloat16, device)
    x, A, B, weights = (t.detach().requires_grad_() for t in (x, A, B, weights))
    delta = asym_lora(x, A, B, weights, experts, 1.0, mask, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(delta, (x, A, B, weights), grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(g is not None for g in grads)


def test_triton_on_a_gpu_that_is_not_the_current_one():
    """A model split over GPUs runs layers on cuda:1 while cuda:0 is current: the kernels
    must launch on the tensors' GPU (route and asym_lora, forward and backward)."""
    if "cuda" not in DEVICES or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    conftest.require_backend("triton", "cuda")
    torch.cuda.set_device(0)
    x, A, B, weights, experts, mask, grad_out = make_inputs(CASES[0], torch.float32, "cuda:1")
    logits = torch.randn(CASES[0].T, CASES[0].N, device="cuda:1")
    entropy = torch.rand(CASES[0].T, device="cuda:1") * 2
    routed = route(logits, entropy, 1.0, 0.8, 0.5, 3, 1, backend="triton")
    expected = route(logits, entropy, 1.0, 0.8, 0.5, 3, 1, backend="eager")
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)  # float32 rounding of the softmax
    got = run("triton", x, A, B, weights, experts, 1.7, mask, grad_out)
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert_matches_reference(got, reference(x, A, B, weights, experts, 1.7, mask, grad_out), torch.float32)


GRADCHECK_EXPERTS = [[0, 2], [1, -1], [2, 2], [-1, -1], [0, 1], [1, 0], [2, -1]]
GRADCHECK_MASK = [True, False, True, True, False, True, False]


@pytest.mark.parametrize("formulation", [asym_lora_eager, asym_lora_eager_dense])
def test_eager_gradcheck_float64(formulation):
    """Both eager formulations, gradients to x, A, B and the route weights (float64
    weights here: the eager functions take any float weights).

    With a mask, dA is on purpose not the derivative of the forward, so gradcheck covers
    x, B and weights there, and dA is checked by the identity
    dA(x, mask) = dA(x ⊙ mask, no mask): a token with x_t = 0 adds dh_t^T x_t = 0, and
    dh_t does not depend on x."""
    T, k, d, r, N, K = 7, 5, 6, 3, 3, 2
    x = torch.randn(T, k, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, d, r, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    experts = torch.tensor(GRADCHECK_EXPERTS, dtype=torch.int32)
    mask = torch.tensor(GRADCHECK_MASK)
    assert torch.autograd.gradcheck(lambda *t: formulation(*t, experts, 0.8), (x, A, B, weights))
    assert torch.autograd.gradcheck(
        lambda x, B, w: formulation(x, A.detach(), B, w, experts, 0.8, mask), (x, B, weights)
    )
    grad_out = torch.randn(T, d, dtype=torch.float64)
    masked_x = (x * mask[:, None]).detach().requires_grad_()
    (masked_grad_A,) = torch.autograd.grad(formulation(x, A, B, weights, experts, 0.8, mask), A, grad_out)
    (expected,) = torch.autograd.grad(formulation(masked_x, A, B, weights, experts, 0.8), A, grad_out)
    torch.testing.assert_close(masked_grad_A, expected, rtol=1e-12, atol=1e-12)  # float64 rounding
    assert masked_grad_A.abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_triton_gradcheck_float64(device):
    """The triton autograd Function is consistent with its own forward (x, A, B and the
    float64 gate weights). fast_mode: random projections of the Jacobian keep the
    interpreter run short."""
    conftest.require_backend("triton", device)
    T, k, d, r, N = 7, 4, 5, 2, 3
    x = torch.randn(T, k, dtype=torch.float64, device=device, requires_grad=True)
    A = torch.randn(r, k, dtype=torch.float64, device=device, requires_grad=True)
    B = torch.randn(N, d, r, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.rand(T, 2, dtype=torch.float64, device=device, requires_grad=True)
    experts = torch.tensor(GRADCHECK_EXPERTS, dtype=torch.int32, device=device)
    assert torch.autograd.gradcheck(
        lambda *t: asym_lora(*t, experts, 0.8, backend="triton"), (x, A, B, weights), fast_mode=True
    )


def test_route_into_asym_lora_gradcheck_float64():
    """The router's gradient through the gate weights: float64 router logits routed by the
    eager reference of route (float64 weights) into the eager asym_lora, gradchecked in
    float64 together with x, A and B. The logits are spaced 0.3 apart and the entropies
    far from the threshold, so finite differences never change the selected experts."""
    T, k, d, r, N = 6, 5, 4, 3, 5
    entropy = torch.tensor([0.3, 2.0, 1.0, 1.5, 0.1, 3.0], dtype=torch.float64)
    ranks = torch.stack([torch.randperm(N) for _ in range(T)]).double()
    router_logits = (ranks * 0.3 + torch.rand(T, N, dtype=torch.float64) * 0.075).requires_grad_()
    x = torch.randn(T, k, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, d, r, dtype=torch.float64, requires_grad=True)

    def delta(router_logits, x, A, B):
        # threshold 1.2: tokens 1, 3, 5 are high entropy (top 3 at tau 0.8), the others top 2 at tau 0.5
        weights, experts = route_eager(router_logits, entropy, 1.2, 0.8, 0.5, 3, 2)
        assert weights.dtype == torch.float64
        return asym_lora(x, A, B, weights, experts, 0.8, backend="eager")

    assert torch.autograd.gradcheck(delta, (router_logits, x, A, B))
    (grad_logits,) = torch.autograd.grad(delta(router_logits, x, A, B).sum(), router_logits)
    assert grad_logits.abs().max() > 0  # the gate weights do carry gradient to the router


def _valid_args():
    T, k, d, r, N, K = 5, 4, 3, 2, 3, 2
    return dict(
        x=torch.randn(T, k),
        A=torch.randn(r, k),
        B=torch.randn(N, d, r),
        weights=torch.rand(T, K),
        experts=torch.randint(-1, N, (T, K), dtype=torch.int32),
        scaling=1.0,
        a_grad_mask=torch.ones(T, dtype=torch.bool),
    )


BAD_INPUTS = [
    ("x", lambda a: a["x"][0], ValueError, "x must have 2 dimensions"),
    ("x", lambda a: a["x"].long(), TypeError, "x must have dtype"),
    ("A", lambda a: a["A"].double(), TypeError, "x, A and B must share one dtype"),
    ("B", lambda a: a["B"][0], ValueError, "B must have 3 dimensions"),
    ("weights", lambda a: a["weights"].double(), TypeError, r"weights must have dtype in \(float32\), got float64"),
    ("experts", lambda a: a["experts"].long(), TypeError, "experts must have dtype"),
    ("a_grad_mask", lambda a: a["a_grad_mask"].float(), TypeError, "a_grad_mask must have dtype"),
    ("scaling", lambda a: "2", TypeError, "scaling must be a real number"),
    ("scaling", lambda a: float("nan"), ValueError, "scaling must be finite, got nan"),
    ("scaling", lambda a: float("inf"), ValueError, "scaling must be finite, got inf"),
    ("A", lambda a: torch.randn(2, 7), ValueError, r"A must be \[r, k=4\]"),
    ("B", lambda a: torch.randn(3, 3, 5), ValueError, r"B must be \[N, d, r=2\]"),
    ("weights", lambda a: a["weights"][:, :1], ValueError, "weights .* and experts .* must have one shape"),
    ("experts", lambda a: a["experts"][:4], ValueError, r"experts must be \[T=5, K>=1\]"),
    ("a_grad_mask", lambda a: a["a_grad_mask"][:4], ValueError, r"a_grad_mask must be \[T=5\]"),
    ("experts", lambda a: torch.full_like(a["experts"], 3), ValueError, r"experts holds id 3, outside \[-1, 3\)"),
    ("experts", lambda a: torch.full_like(a["experts"], -2), ValueError, "experts holds id -2"),
    ("x", lambda a: a["x"].to("meta"), ValueError, "all tensors must be on one device"),
    ("out", lambda a: torch.randn(5, 3).double(), TypeError, "out must have dtype"),
    ("out", lambda a: torch.randn(5, 4), ValueError, r"out must be \[\.\.\., d=3\] with T=5 rows"),
    ("out", lambda a: torch.randn(5, 3).to("meta"), ValueError, "all tensors must be on one device"),
]


@pytest.mark.parametrize("name, corrupt, error, message", BAD_INPUTS, ids=[b[3] for b in BAD_INPUTS])
def test_bad_input_raises(name, corrupt, error, message):
    args = _valid_args()
    args[name] = corrupt(args)
    with pytest.raises(error, match=message):
        asym_lora(**args)


def test_out_that_is_no_view_of_t_rows_raises():
    args = _valid_args()
    T = 6
    args.update(x=torch.randn(T, 4), weights=torch.rand(T, 2), experts=torch.zeros(T, 2, dtype=torch.int32),
                a_grad_mask=None)
    out = torch.randn(3, 2, 3).transpose(0, 1)  # [2, 3, 3]: rows 0..5 are not one stride apart
    with pytest.raises(ValueError, match=r"viewable as \[T, d\] \(no copy\)"):
        asym_lora(**args, out=out)
    assert asym_lora(**args, out=out.contiguous()).shape == (2, 3, 3)


def test_expert_id_check_can_be_skipped_by_callers_with_valid_ids(monkeypatch):
    """check_expert_ids=False skips only the range check (its host sync on a GPU): the
    result is the same and the shape checks still run."""
    args = _valid_args()
    expected = asym_lora(**args)
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    torch.testing.assert_close(asym_lora(**args, check_expert_ids=False), expected, rtol=0, atol=0)
    assert calls == []
    with pytest.raises(ValueError, match=r"experts must be \[T=5, K>=1\]"):
        asym_lora(**{**args, "experts": args["experts"][:4]}, check_expert_ids=False)


def test_rank_zero_and_bad_backend_raise():
    args = _valid_args()
    args["A"], args["B"] = torch.randn(0, 4), torch.randn(3, 3, 0)
    with pytest.raises(ValueError, match="rank r = A.shape.0. must be >= 1"):
        asym_lora(**args)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        asym_lora(**_valid_args(), backend="fast")
    with pytest.raises(BackendUnavailable, match="no 'cpp' backend"):
        asym_lora(**_valid_args(), backend="cpp")


def test_kernels_compile_for_hopper():
    """The interpreter never lowers the kernels: compile the expand kernel for sm_90 with
    every tile row of the GPU tables (EXPAND_TILES) for its dtypes, writing a new tensor
    or accumulating into out, top-3 and forced (one slot) routes; bf16 and fp16 tiles must
    use tensor cores (Hopper's wgmma for 64- and 128-row tiles; 16-row tiles, too small
    for a warpgroup, get mma). benchmarks/compile_report.py adds registers and spills at
    the real shapes."""
    kernels = importlib.import_module("alter_kernels.asym_lora")
    tiles = (  # data dtype, dot dtype, input precision, accumulator dtype, tables, tensor cores
        ("bf16", "tl.bfloat16", "tf32", "fp32", (90,), True),
        ("fp16", "tl.float16", "tf32", "fp32", (90,), True),
        ("fp32", "tl.float32", "ieee", "fp32", ("wide",), False),
        ("fp64", "tl.float64", "tf32", "fp64", ("wide",), False),
    )
    specs = []
    for data, dot, precision, acc, tables, tensor_cores in tiles:
        signature = dict(experts_ptr="*i32", weights_ptr="*fp32", scaling_ptr="*" + acc,
                         h_ptr="*" + data, B_ptr="*" + data, out_ptr="*" + data)
        rows = sorted({row[2:] for table in tables for row in kernels.EXPAND_TILES[table]})
        for block_m, block_n, block_kr, num_warps, _ in rows:
            # (N, r, slots, accumulate): the Llama shape (N·r = 64), a rank that is no power of
            # two with N·r = 120 > 64 (K steps), forced routes accumulating into out
            variants = ((8, 8, 3, False), (5, 24, 2, False), (2, 8, 1, True)) if data == "bf16" else ((8, 8, 3, True),)
            for num_experts, rank, slots, accumulate in variants:
                constexprs = dict(N=num_experts, R=rank, NUM_SLOTS=slots, ACCUMULATE=accumulate,
                                  K_STEPS=-(-num_experts * rank // block_kr), BLOCK_M=block_m, BLOCK_N=block_n,
                                  BLOCK_KR=block_kr, DOT_DTYPE=dot, DOT_PRECISION=precision,
                                  ACC_DTYPE="tl.float" + acc[2:])
                specs.append(dict(module="alter_kernels.asym_lora", kernel="_gated_expand_kernel",
                                  signature=signature, constexprs=constexprs, num_warps=num_warps,
                                  ptx_contains=("wgmma" if block_m >= 64 else "mma") if tensor_cores else ""))
    assert_compiles_for_hopper(specs)
