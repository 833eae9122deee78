"""The dispatcher's dense path of AsymLoRALinear (every expert on every token, the top-k
gate as a mask; always on the CPU, and for calls of <= 16 tokens elsewhere): outputs and
gradients against a float64 routing written here from DESIGN.md §1, the weights it keeps
between no-grad calls, and a decode step that reads no device value on the host."""
import pytest
import torch
from torch import nn

from alter.config import AlterConfig
from alter.layers import AsymLoRALinear
from alter.model import apply_alter
from test_model import randomize_adapters, tiny_model, tokens

IN, OUT, RANK, EXPERTS, ALPHA = 29, 37, 5, 6, 7.0  # not powers of two
K_HIGH, K_LOW, THRESHOLD, TAU_HIGH, TAU_LOW = 3, 2, 1.2, 0.8, 0.05


def make_layer(dtype=torch.float64, **kwargs):
    config = AlterConfig(r=RANK, alpha=ALPHA, num_experts=EXPERTS, k_high=K_HIGH, k_low=K_LOW, tau_high=TAU_HIGH,
                         tau_low=TAU_LOW, entropy_threshold=THRESHOLD, **kwargs)
    layer = AsymLoRALinear(nn.Linear(IN, OUT).to(dtype), config)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.3)
        layer.router.weight.normal_(0.0, 0.5)
        layer.router.entropy_weight.normal_(0.0, 0.5)
    return layer


def params64(layer, requires_grad=False):
    """The layer's parameters as float64 leaves, by name."""
    named = dict(layer.named_parameters())
    return {n: t.detach().double().requires_grad_(requires_grad) for n, t in named.items()}


def reference64(layer, x, entropy, p=None):
    """W0 x + b + s Σ_kept softmax((l - max l) / tau) B_e A x, token by token in float64;
    kept = the k largest logits, ties to the lower expert."""
    p = params64(layer) if p is None else p
    rows = []
    for xt, st in zip(x.double().reshape(-1, IN), entropy.double().reshape(-1)):
        logits = p["router.weight"] @ xt + st * p["router.entropy_weight"]
        high = bool(st > THRESHOLD)
        k, tau = (K_HIGH, TAU_HIGH) if high else (K_LOW, TAU_LOW)
        order = sorted(range(EXPERTS), key=lambda e: (-float(logits[e].detach()), e))[:k]
        weights = torch.softmax(torch.stack([(logits[e] - logits.max().detach()) / tau for e in order]), 0)
        h = p["lora_A"] @ xt
        delta = sum(w * (p["lora_B"][e] @ h) for w, e in zip(weights, order))
        rows.append(p["base_layer.weight"] @ xt + p["base_layer.bias"] + layer.scaling * delta)
    return torch.stack(rows).reshape(*x.shape[:-1], OUT)


@pytest.mark.parametrize("tokens_per_call", [1, 7, 40])  # decode, a short call, a prefill
def test_dense_path_matches_float64_routing(tokens_per_call):
    layer = make_layer()
    x = torch.randn(2, tokens_per_call, IN, dtype=torch.float64)
    entropy = torch.rand(2, tokens_per_call) * 2.4  # both sides of the threshold
    with layer.tracker.precomputed(entropy), torch.no_grad():
        torch.testing.assert_close(layer(x), reference64(layer, x, entropy), rtol=1e-10, atol=1e-10)


def test_dense_path_gradients_match_float64_autograd():
    layer = make_layer()
    x = torch.randn(3, 5, IN, dtype=torch.float64, requires_grad=True)
    entropy = torch.rand(3, 5) * 2.4
    grad = torch.randn(3, 5, OUT, dtype=torch.float64)
    with layer.tracker.precomputed(entropy):
        layer(x).backward(grad)
    x64 = x.detach().clone().requires_grad_()
    p = params64(layer, requires_grad=True)
    reference64(layer, x64, entropy, p).backward(grad)
    torch.testing.assert_close(x.grad, x64.grad, rtol=1e-10, atol=1e-10)
    for name, param in layer.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, p[name].grad, rtol=1e-10, atol=1e-10)


def test_forced_routes_and_ties_on_the_dense_path():
    """A fresh router (all logits equal) keeps the lowest experts, as route does; a forced
    route is plain LoRA of that expert."""
    layer = make_layer()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.entropy_weight.zero_()
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    entropy = torch.rand(2, 3) * 2.4
    with layer.tracker.precomputed(entropy), torch.no_grad():
        torch.testing.assert_close(layer(x), reference64(layer, x, entropy), rtol=1e-10, atol=1e-10)
        with layer.tracker.forced(torch.tensor([4, 1])):
            y = layer(x)
    h = x @ layer.lora_A.detach().t()
    want = layer.base_layer(x) + layer.scaling * torch.einsum("blr,bor->blo", h, layer.lora_B.detach()[[4, 1]])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_kept_weights_follow_in_place_updates():
    """No-grad calls keep the stacked weights; an optimizer step (in place) or a load
    must be seen by the next call."""
    layer = make_layer()
    x = torch.randn(1, 1, IN, dtype=torch.float64)
    entropy = torch.full((1, 1), 2.0)
    with layer.tracker.precomputed(entropy), torch.no_grad():
        layer(x)
        for param in (layer.lora_A, layer.lora_B, layer.router.weight):
            param.add_(0.25)
            torch.testing.assert_close(layer(x), reference64(layer, x, entropy), rtol=1e-10, atol=1e-10)


def test_decode_step_reads_no_device_value(monkeypatch):
    """A decode step with the KV cache (lagged entropy, the dispatcher's choice) calls no
    .item(), .tolist(), nonzero or bool() of a tensor: on a GPU each is a host sync."""
    model = apply_alter(tiny_model(), AlterConfig(r=4, num_experts=3, entropy_source="lagged"))
    randomize_adapters(model, 0.5)
    with torch.no_grad():
        prefill = model(input_ids=tokens(seq=5), use_cache=True)
    next_ids = prefill.logits[:, -1:].argmax(-1)
    calls = []
    for name in ("item", "tolist", "nonzero", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    original_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append("torch.nonzero") or original_nonzero(*a, **k))
    with torch.no_grad():
        model(input_ids=next_ids, past_key_values=prefill.past_key_values, use_cache=True)
    assert calls == []
