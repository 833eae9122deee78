"""gated_asym_lora, the fused inference adapter: every backend against float64 routing
(``reference_route``, DESIGN.md §1) and a float64 delta written here (eq. 6), the
backends against each other, ties, -inf and NaN logits, forced experts, and bad input."""
import math

import pytest
import torch

from alter_kernels import gated_asym_lora
from _reference import reference_route
from conftest import require_backend
from conftest import test_devices as devices_under_test  # aliased: pytest would collect test_*

DEVICES = devices_under_test()
BACKENDS = ["eager", "cpp", "triton"]
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
        pytest.skip("gated_asym_lora's cpp kernel is CPU-only (on a GPU the dispatcher takes triton)")


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


def tolerance(dtype, device):
    """TOLERANCE, with float32 on a GPU at 1e-4: the kernel's and cuBLAS's summation orders
    differ by float32 rounding, which tau_low = 0.01 scales by 100 in a gate's exponent."""
    if device != "cpu" and dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return TOLERANCE[dtype]


def settings(dtype):
    """The routing settings of a test in ``dtype``. For 16-bit x a GPU kernel's shrink may
    round a logit one step away from the reference GEMM's (another summation order), and at
    tau 0.01 one bf16 step of a logit near 2 is e^0.8 in a gate: tau_low 0.5 there."""
    return {**SETTINGS, "tau_low": 0.5} if dtype in (torch.float16, torch.bfloat16) else SETTINGS


def reference(out, x, stacked, entropy_weight, entropy, expand, num_experts, k_high, k_low, experts=None):
    """float64: the shrink GEMM in x's dtype (as both backends compute it: the gate is
    what is tested), then routing by reference_route and out + Σ_e G_te (s·B_e) h_t."""
    tau_low = settings(x.dtype)["tau_low"]
    shrunk = (x @ stacked.t()).cpu().double()
    rank = stacked.shape[0] - num_experts
    h = shrunk[:, num_experts:]
    gate = torch.zeros(x.shape[0], num_experts, dtype=torch.float64)
    if experts is None:
        logits = shrunk[:, :num_experts] + entropy.cpu().double()[:, None] * entropy_weight.cpu().double()
        weights, chosen = reference_route(logits, entropy.cpu(), THRESHOLD, TAU_HIGH, tau_low, k_high, k_low)
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
    if backend == "triton" and dtype == torch.float64:  # the kernel's scalars are float32
        with pytest.raises(ValueError, match="float16/bfloat16/float32 x"):
            gated_asym_lora(out, x, stacked, u, entropy, expand, num_experts, k_high=k_high, k_low=k_low,
                            backend=backend, **settings(dtype))
        return
    got = gated_asym_lora(out, x, stacked, u, entropy, expand, num_experts, k_high=k_high, k_low=k_low,
                          backend=backend, **settings(dtype))
    assert got is out and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), want, **tolerance(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_experts_and_ties(device, backend):
    """experts given: each token is plain LoRA of its expert; a zero router (all logits
    tie) keeps the lowest k experts, as route does."""
    require(backend, device)
    out, x, stacked, u, entropy, expand = make_inputs(11, 6, 4, torch.float32, device)
    experts = torch.randint(0, 6, (11,), dtype=torch.int32, device=device)
    want = reference(out, x, stacked, u, entropy, expand, 6, 3, 1, experts)
    gated_asym_lora(out, x, stacked, u, entropy, expand, 6, k_high=3, k_low=1, experts=experts, backend=backend,
                    **SETTINGS)
    torch.testing.assert_close(out.cpu().double(), want, **tolerance(torch.float32, device))

    out, x, stacked, u, entropy, expand = make_inputs(11, 6, 4, torch.float32, device)
    stacked[:6], u[:] = 0.0, 0.0
    want = reference(out, x, stacked, u, entropy, expand, 6, 3, 2)
    gated_asym_lora(out, x, stacked, u, entropy, expand, 6, k_high=3, k_low=2, backend=backend, **SETTINGS)
    torch.testing.assert_close(out.cpu().double(), want, **tolerance(torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_and_nan_stays_in_its_row(device):
    """A NaN in a token's input makes its row NaN on every backend (never a silent
    answer), the other rows equal across backends."""
    out, x, stacked, u, entropy, expand = make_inputs(9, 7, 6, torch.float32, device)
    x = x.clone()
    x[4, 3] = float("nan")
    results = {}
    for backend in [b for b in BACKENDS if b != "cpp" or device == "cpu"]:
        require_backend(backend, device)
        results[backend] = gated_asym_lora(out.clone(), x, stacked, u, entropy, expand, 7, k_high=3, k_low=1,
                                           backend=backend, **SETTINGS)
        assert results[backend][4].isnan().all() and not results[backend][torch.arange(9) != 4].isnan().any()
    for backend, result in results.items():
        torch.testing.assert_close(result, results["eager"], **tolerance(torch.float32, device), equal_nan=True)


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
        (dict(out=torch.zeros(1, OUT).expand(5, OUT)), ValueError, "rows of unit stride that do not overlap"),
        (dict(k_high=5), ValueError, "k_high must be in \\[1, 4\\]"),
        (dict(k_low=3), ValueError, "k_low must be in \\[1, 2\\]"),
        (dict(tau_low=0.0), ValueError, "tau_low must be a finite number > 0"),
        (dict(threshold=math.nan), ValueError, "threshold must not be NaN"),
        (dict(experts=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)), ValueError, "outside \\[0, 4\\)"),
        (dict(experts=torch.zeros(5, dtype=torch.int64)), TypeError, "experts must have dtype in \\(int32\\)"),
        (dict(experts=torch.zeros(4, dtype=torch.int32)), ValueError, "experts must be \\[T=5\\]"),
        (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
        (dict(backend="triton", num_experts=1, k_high=1, k_low=1, stacked=torch.randn(18, IN), entropy_weight=u[:1],
              expand=torch.randn(17, OUT)), ValueError, "r <= 16"),  # r = 17
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            call(**change)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_patched_model_decodes_alike_on_every_backend(backend, monkeypatch):
    """A prefill and a decode step of a patched model without autograd, with each backend
    of AsymLoRALinear's fused call, give the logits of the layers' own composition."""
    from alter.adapters import layers
    from alter.config import AlterConfig
    from alter.model import apply_alter
    from test_model import randomize_adapters, tiny_model, tokens

    require(backend, "cpu")
    # Every expert kept at one temperature: the gate is continuous in the logits, so the
    # float32 rounding differences of the paths cannot flip a route (the selection and the
    # threshold are the op-level tests' business); this checks the layer's plumbing.
    config = AlterConfig(r=5, num_experts=6, k_high=6, k_low=6, tau_high=0.5, tau_low=0.5, entropy_source="lagged")
    # float64 where the backend takes it; the kernel's float32 differs from the composition's
    # by rounding, which 2 layers of attention amplify ~100x: a layout or scaling error is O(1)
    dtype, tolerance = (torch.float32, 1e-3) if backend == "triton" else (torch.float64, 1e-10)
    model = apply_alter(tiny_model().to(dtype), config)
    randomize_adapters(model, 0.5)
    ids = tokens(seq=7)

    def prefill_and_step():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True)
        return prefill.logits.detach(), step.logits.detach()

    # the layers' composition of differentiable ops, without autograd too: grad mode
    # changes other kernels of the model (attention) at the 1e-4 level
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(layers.AsymLoRALinear, "_fused_inference", lambda self: False)
        want = prefill_and_step()
    calls = []
    run = layers.run_gated_asym_lora

    def recorded(*args, **kwargs):
        calls.append(args[0])
        return run(*args, **kwargs)

    monkeypatch.setattr(layers, "choose_backend", lambda device: backend)
    monkeypatch.setattr(layers, "run_gated_asym_lora", recorded)
    with torch.no_grad():
        got = prefill_and_step()
    assert calls == [backend] * (2 * len(layers_of(model)))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance)


def layers_of(model):
    from alter.adapters import alter_layers

    return alter_layers(model)


def test_layer_edge_calls_without_autograd():
    """Under CPU autocast a no-grad call follows the composition's dtypes (bf16), as the
    autograd path does; a call with no tokens returns an empty output on both paths."""
    from torch import nn

    from alter.adapters.layers import AsymLoRALinear
    from alter.config import AlterConfig

    layer = AsymLoRALinear(nn.Linear(12, 10), AlterConfig(r=4, num_experts=4, k_high=2, k_low=1,
                                                          entropy_source="precomputed")).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    x = torch.randn(2, 5, 12)
    with layer.tracker.precomputed(torch.rand(2, 5) * 2), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        with torch.no_grad():
            got = layer(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    for grad in (True, False):
        with layer.tracker.precomputed(torch.rand(0, 5)), torch.set_grad_enabled(grad):
            assert layer(torch.randn(0, 5, 12)).shape == (0, 5, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_in_an_autocast_region_keeps_its_dtype(backend):
    require(backend, "cpu")
    out, x, stacked, u, entropy, expand = make_inputs(5, 4, 3, torch.float32, "cpu")
    want = reference(out, x, stacked, u, entropy, expand, 4, 2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gated_asym_lora(out, x, stacked, u, entropy, expand, 4, k_high=2, k_low=1, backend=backend, **SETTINGS)
    torch.testing.assert_close(out.double(), want, **TOLERANCE[torch.float32])
