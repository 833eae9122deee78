"""gated_asym_lora, the fused inference adapter: every backend against float64 routing
(``reference_route``, DESIGN.md §1) and a float64 delta written here (eq. 6), the
backends against each other, ties, -inf and NaN logits, forced experts, and bad input."""
import math

import pytest
import torch

from alter_kernels import BackendUnavailable, gated_asym_lora
from _reference import reference_route
from conftest import require_backend
from conftest import test_devices as devices_under_test  # aliased: pytest would collect test_*

DEVICES = devices_under_test()
BACKENDS = ["eager", "cpp"]
IN, OUT = 29, 43  # not powers of two
THRESHOLD, TAU_HIGH, TAU_LOW = 1.25, 0.8, 0.01
SETTINGS = dict(threshold=THRESHOLD, tau_high=TAU_HIGH, tau_low=TAU_LOW)
# float64 and float32 arithmetic against float64; 16-bit: the gate and the gated rank are
# rounded to the dtype, and the expand GEMM accumulates in it
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
             torch.bfloat16: dict(rtol=4e-2, atol=4e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def require(backend, device):
    require_backend(backend, device)
    if backend == "cpp" and device != "cpu":
        pytest.skip("gated_asym_lora's cpp kernel is CPU-only (on a GPU the dispatcher takes eager)")


def make_inputs(num_tokens, num_experts, rank, dtype, device):
    """Non-contiguous x; expert N-1 unavailable (u = -inf, every entropy > 0); entropies on
    both sides of THRESHOLD, some exactly at it; out holds a base output."""
    x = torch.randn(IN, 2 * num_tokens, device=device).to(dtype).t()[::2]
    assert not x.is_contiguous()
    stacked = (torch.randn(num_experts + rank, IN, device=device) * 0.4).to(dtype)
    entropy_weight = torch.randn(num_experts, device=device)
    entropy_weight[num_experts - 1] = float("-inf")
    entropy = torch.rand(num_tokens, device=device) * 2 * THRESHOLD + 1e-3
    entropy[::7] = THRESHOLD
    expand = (torch.randn(num_experts * rank, OUT, device=device) * 0.3).to(dtype)
    out = torch.randn(num_tokens, OUT, device=device).to(dtype)
    return out, x, stacked, entropy_weight, entropy, expand


def reference(out, x, stacked, entropy_weight, entropy, expand, num_experts, k_high, k_low, experts=None):
    """float64: the shrink GEMM in x's dtype (as both backends compute it: the gate is
    what is tested), then routing by reference_route and out + Σ_e G_te (s·B_e) h_t."""
    shrunk = (x @ stacked.t()).cpu().double()
    rank = stacked.shape[0] - num_experts
    h = shrunk[:, num_experts:]
    gate = torch.zeros(x.shape[0], num_experts, dtype=torch.float64)
    if experts is None:
        logits = shrunk[:, :num_experts] + entropy.cpu().double()[:, None] * entropy_weight.cpu().double()
        weights, chosen = reference_route(logits, entropy.cpu(), THRESHOLD, TAU_HIGH, TAU_LOW, k_high, k_low)
        for t in range(x.shape[0]):
            for w, e in zip(weights[t].tolist(), chosen[t].tolist()):
                if e >= 0:
                    gate[t, e] = w
    else:
        gate[torch.arange(x.shape[0]), experts.cpu().long()] = 1.0
    gated = (gate[:, :, None] * h[:, None, :]).reshape(x.shape[0], num_experts * rank)
    return out.cpu().double() + gated @ expand.cpu().double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,num_experts,rank,k_high,k_low", [(1, 3, 5, 2, 1), (5, 6, 5, 3, 2),
                                                                      (37, 8, 8, 3, 1), (37, 5, 3, 5, 5)])
def test_matches_float64_routing(device, backend, dtype, num_tokens, num_experts, rank, k_high, k_low):
    require(backend, device)
    out, x, stacked, u, entropy, expand = make_inputs(num_tokens, num_experts, rank, dtype, device)
    want = reference(out, x, stacked, u, entropy, expand, num_experts, k_high, k_low)
    got = gated_asym_lora(out, x, stacked, u, entropy, expand, num_experts, k_high=k_high, k_low=k_low,
                          backend=backend, **SETTINGS)
    assert got is out and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_experts_and_ties(device, backend):
    """experts given: each token is plain LoRA of its expert; a zero router (all logits
    tie) keeps the lowest k experts, as route does."""
    require(backend, device)
    out, x, stacked, u, entropy, expand = make_inputs(11, 6, 4, torch.float64, device)
    experts = torch.randint(0, 6, (11,), dtype=torch.int32, device=device)
    want = reference(out, x, stacked, u, entropy, expand, 6, 3, 1, experts)
    gated_asym_lora(out, x, stacked, u, entropy, expand, 6, k_high=3, k_low=1, experts=experts, backend=backend,
                    **SETTINGS)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-10, atol=1e-10)

    out, x, stacked, u, entropy, expand = make_inputs(11, 6, 4, torch.float64, device)
    stacked[:6], u[:] = 0.0, 0.0
    want = reference(out, x, stacked, u, entropy, expand, 6, 3, 2)
    gated_asym_lora(out, x, stacked, u, entropy, expand, 6, k_high=3, k_low=2, backend=backend, **SETTINGS)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_and_nan_stays_in_its_row(device):
    """A NaN in a token's input makes its row NaN on every backend (never a silent
    answer), the other rows equal across backends."""
    require("cpp", device)
    out, x, stacked, u, entropy, expand = make_inputs(9, 7, 6, torch.float32, device)
    x = x.clone()
    x[4, 3] = float("nan")
    results = {}
    for backend in BACKENDS:
        results[backend] = gated_asym_lora(out.clone(), x, stacked, u, entropy, expand, 7, k_high=3, k_low=1,
                                           backend=backend, **SETTINGS)
        assert results[backend][4].isnan().all() and not results[backend][torch.arange(9) != 4].isnan().any()
    torch.testing.assert_close(results["cpp"], results["eager"], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_refuses_autograd_and_bad_input():
    out, x, stacked, u, entropy, expand = make_inputs(5, 4, 3, torch.float32, "cpu")

    def call(**change):
        args = dict(out=out, x=x, stacked=stacked, entropy_weight=u, entropy=entropy, expand=expand, num_experts=4,
                    k_high=2, k_low=1, **SETTINGS)
        args.update(change)
        return gated_asym_lora(**args)

    with pytest.raises(RuntimeError, match="inference only"):
        call(stacked=stacked.clone().requires_grad_())
    with torch.no_grad():
        call(stacked=stacked.clone().requires_grad_())  # parameters under no_grad: fine
    cases = [
        (dict(x=x.double()), TypeError, "out must have dtype in \\(float64\\)"),
        (dict(stacked=stacked[:4]), ValueError, "stacked must be \\[N \\+ r, in\\]"),
        (dict(stacked=stacked[:, :-1]), ValueError, "stacked must be"),
        (dict(expand=expand[:-1]), ValueError, "expand must be \\[N·r = 12, d\\]"),
        (dict(entropy_weight=u[:3]), ValueError, "entropy_weight must be \\[N=4\\]"),
        (dict(entropy=entropy[:4]), ValueError, "entropy must be \\[T=5\\]"),
        (dict(entropy=entropy.half()), TypeError, "entropy must have dtype"),
        (dict(out=out[:, :-1]), ValueError, "out \\[T, d\\]"),
        (dict(k_high=5), ValueError, "k_high must be in \\[1, 4\\]"),
        (dict(k_low=3), ValueError, "k_low must be in \\[1, 2\\]"),
        (dict(tau_low=0.0), ValueError, "tau_low must be a finite number > 0"),
        (dict(threshold=math.nan), ValueError, "threshold must not be NaN"),
        (dict(experts=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)), ValueError, "outside \\[0, 4\\)"),
        (dict(experts=torch.zeros(5, dtype=torch.int64)), TypeError, "experts must have dtype in \\(int32\\)"),
        (dict(experts=torch.zeros(4, dtype=torch.int32)), ValueError, "experts must be \\[T=5\\]"),
        (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
        (dict(backend="triton"), BackendUnavailable, "has no 'triton' backend"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            call(**change)
