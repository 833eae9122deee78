"""token_losses (NLL, IHL and entropy of one logits tensor): every backend against the
float64 references of tests/_reference.py (the IHL's and the entropy's closed forms, and
the NLL from a float64 log-softmax), values and the gradient of a random combination of
the three; the one-pass C++ backward against the sum of the per-op gradients.

Tolerances as in test_ihl.py: float32 accumulation on the rounded inputs the reference
reads; gradients relative to their largest entry, two ulps of the storage dtype.
"""
import pytest
import torch

from alter_kernels import token_losses
from alter_kernels.entropy import row_kernel_config
from _reference import (assert_close, assert_compiles_for_hopper, grid, log_softmax64, reference_entropy,
                        reference_entropy_grad, reference_ihl, threshold_between)
from conftest import require_backend
from conftest import test_devices as devices_under_test  # renamed: pytest would collect test_*
from test_ihl import ihl_inputs

DEVICES = devices_under_test()
BACKENDS = ["eager", "triton", "cpp"]
IGNORE = -100
HIGH_ENTROPY_WEIGHT = 0.3
T = 6  # the tokens of ihl_inputs
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}


def inputs(vocab, dtype, device):
    """test_ihl's six tokens (random, ignored, half-masked vocabulary, masked target with
    NLL +inf, only the target unmasked, random) as a non-contiguous row view."""
    return ihl_inputs(vocab, dtype, device)


def reference(logits, labels, q, threshold, upstream):
    """float64 (nll, ihl, weight, entropy) and the gradient of Σ g_N nll + g_I ihl + g_S S."""
    z = logits.double().cpu()
    labels = labels.cpu()
    ignored = labels == IGNORE
    log_p = log_softmax64(z)
    safe = labels.masked_fill(ignored, 0)
    nll = (-log_p.gather(1, safe[:, None])[:, 0]).masked_fill(ignored, 0.0)
    grad_nll = log_p.exp() - torch.nn.functional.one_hot(safe, z.shape[1]).double()
    grad_nll[ignored] = 0.0
    ihl = reference_ihl(z, labels, q, threshold, HIGH_ENTROPY_WEIGHT, IGNORE)
    g_nll, g_ihl, g_entropy = (g.double().cpu() for g in upstream)
    grad = g_nll[:, None] * grad_nll + g_ihl[:, None] * ihl.grad + reference_entropy_grad(z, q, g_entropy)
    return nll, ihl.loss, ihl.weight, reference_entropy(z, q), grad


@grid(device=DEVICES, backend=BACKENDS, dtype=[torch.float32, torch.float16, torch.bfloat16], vocab=[1, 7, 1003],
      q=[0.5, 1.0, 2.0])
def test_token_losses_match_float64(device, backend, dtype, vocab, q):
    require_backend(backend, device)
    logits, labels = inputs(vocab, dtype, device)
    ignored = labels.cpu() == IGNORE
    threshold = threshold_between(reference_entropy(logits.double().cpu(), q), ignored)
    upstream = [torch.randn(T, device=device) for _ in range(3)]
    want = reference(logits, labels, q, threshold, upstream)
    leaf = logits.detach().requires_grad_()
    got = token_losses(leaf, labels, q, threshold, HIGH_ENTROPY_WEIGHT, backend=backend)
    assert all(value.dtype == torch.float32 and value.shape == (T,) for value in got)
    assert got.nll.requires_grad and got.ihl.requires_grad and got.entropy.requires_grad and not got.weight.requires_grad
    finite = ~torch.isinf(want[0])  # the masked target's NLL is +inf on every path
    assert torch.isinf(got.nll.detach().cpu()[~finite]).all()
    assert_close(got.nll.detach()[finite.to(device)], want[0][finite], 1e-5, 2e-5, "nll")
    for name, value, expected in zip(("ihl", "weight", "entropy"), got[1:], want[1:4]):
        assert_close(value.detach(), expected, 2e-5, 2e-6, name)
    # the NLL's +inf is left out of the gradient: its token contributes no NLL gradient
    g_nll = upstream[0].masked_fill(~finite.to(device), 0.0)
    combined = (got.nll.masked_fill(~finite.to(device), 0.0) * g_nll).sum() + (got.ihl * upstream[1]).sum() \
        + (got.entropy * upstream[2]).sum()
    (grad,) = torch.autograd.grad(combined, leaf)
    want_grad = reference(logits, labels, q, threshold, [g_nll, upstream[1], upstream[2]])[4]
    assert grad.dtype == dtype
    # at V = 1 every gradient is 0 and the kernels' g_N p - g_N leaves float32 residue: absolute there
    scale = want_grad.abs().max().clamp_min(1.0)
    assert_close(grad.cpu() / scale, want_grad / scale, 0, GRAD_TOL[dtype], "grad")


@grid(device=DEVICES, backend=BACKENDS, used=["nll", "ihl", "entropy"])
def test_one_loss_alone(device, backend, used):
    """A combination that leaves two outputs unused (their gradients are None) gets the
    gradient of the one used."""
    require_backend(backend, device)
    logits, labels = inputs(1003, torch.float32, device)
    logits[2:4] = torch.randn(2, 1003, device=device)  # finite targets: the NLL is finite
    leaf = logits.detach().requires_grad_()
    got = token_losses(leaf, labels, 1.2, 1.0, HIGH_ENTROPY_WEIGHT, backend=backend)
    g = torch.randn(T, device=device)
    (grad,) = torch.autograd.grad((getattr(got, used) * g).sum(), leaf)
    upstream = [g if name == used else torch.zeros(T) for name in ("nll", "ihl", "entropy")]
    want = reference(logits, labels, 1.2, 1.0, upstream)[4]
    scale = want.abs().max()
    assert_close(grad.cpu() / scale, want / scale, 0, 1e-5, used)


def test_bad_input():
    logits = torch.randn(4, 9)
    with pytest.raises(ValueError, match="token_losses: labels must be in \\[0, 9\\)"):
        token_losses(logits, torch.tensor([0, 1, 9, 2]), 1.2, 1.0)
    with pytest.raises(ValueError, match="token_losses: labels must have shape"):
        token_losses(logits, torch.tensor([0, 1]), 1.2, 1.0)
    with pytest.raises(ValueError, match="all -inf"):
        token_losses(torch.full((2, 9), float("-inf")), torch.tensor([0, 1]), 1.2, 1.0)
    with pytest.raises(ValueError, match="q must be"):
        token_losses(logits, torch.tensor([0, 1, 2, 3]), 0.0, 1.0)


@grid(device=DEVICES, backend=BACKENDS, left_out=["nll", "ihl"])
def test_a_loss_left_out(device, backend, left_out):
    """nll=False or ihl=False: that loss (and the IHL's weight) is None, the others and
    the gradient of what is used are unchanged."""
    require_backend(backend, device)
    logits, labels = inputs(1003, torch.float32, device)
    logits[2:4] = torch.randn(2, 1003, device=device)
    every = token_losses(logits, labels, 1.2, 1.0, HIGH_ENTROPY_WEIGHT, backend=backend)
    leaf = logits.detach().requires_grad_()
    got = token_losses(leaf, labels, 1.2, 1.0, HIGH_ENTROPY_WEIGHT, backend=backend, **{left_out: False})
    kept = "ihl" if left_out == "nll" else "nll"
    assert getattr(got, left_out) is None and (got.weight is None) == (left_out == "ihl")
    torch.testing.assert_close(getattr(got, kept), getattr(every, kept))
    torch.testing.assert_close(got.entropy, every.entropy)
    g = [torch.randn(T, device=device) for _ in range(2)]
    (grad,) = torch.autograd.grad((getattr(got, kept) * g[0]).sum() + (got.entropy * g[1]).sum(), leaf)
    upstream = [g[0], torch.zeros(T), g[1]] if kept == "nll" else [torch.zeros(T), g[0], g[1]]
    want = reference(logits, labels, 1.2, 1.0, upstream)[4]
    scale = want.abs().max()
    assert_close(grad.cpu() / scale, want / scale, 0, 1e-5, "grad")


def test_token_losses_backward_kernel_compiles_for_hopper():
    """The combined backward lowered for sm_90 at a Llama-3 vocabulary's launch config."""
    config = row_kernel_config(128256)
    specs = []
    for data in ("bf16", "fp16", "fp32"):
        signature = {name: "*fp32" for name in ("grad_nll_ptr", "grad_ihl_ptr", "grad_entropy_ptr", "entropy_ptr",
                                                "row_max_ptr", "log_sum_ptr", "power_sum_ptr")}
        signature.update(logits_ptr="*" + data, grad_logits_ptr="*" + data, labels_ptr="*i64", runner_up_ptr="*i32",
                         q="fp32")
        for shannon in (False, True):
            specs.append(dict(module="alter_kernels.token_losses", kernel="_token_losses_backward_kernel",
                              signature=signature, constexprs={"BLOCK_V": config["BLOCK_V"], "SHANNON": shannon},
                              num_warps=config["num_warps"], ptx_contains="ex2.approx.ftz.f32"))
    assert_compiles_for_hopper(specs)


@grid(device=DEVICES, backend=BACKENDS)
def test_nll_exact_at_large_logits(device, backend):
    """nll = (m - z_y) + log s: at a logit offset of 1000 (a float32 ulp there is 6e-5) the
    NLL of a near-certain token (1.8e-4) keeps the error of float32's log s near 1 (two ulps
    of 1.0), as at offset 0; m + log s - z_y would be off by 6e-5."""
    require_backend(backend, device)
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    want = float(-log_softmax64(logits)[0, 0])
    got = token_losses((logits + 1000).float().to(device), torch.tensor([0], device=device), 1.2, 1.0,
                       backend=backend).nll
    assert abs(float(got) - want) <= 2 * 2**-23
