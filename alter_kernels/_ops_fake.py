"""Fake (meta) kernels of the compiled ops ``torch.ops.alter_kernels.*``.

They give output shapes and dtypes without computing, so the ops trace under
``torch.compile`` and run on meta tensors. ``alter_kernels._C`` names this module
(``set_python_module``), and :func:`alter_kernels._dispatch.cpp_extension` imports it
right after loading the extension.
"""
from __future__ import annotations

import torch


def _token_vector(logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=dtype)


def _grad_like(logits: torch.Tensor) -> torch.Tensor:
    # the kernels write a fresh contiguous gradient whatever the logits' row stride
    return logits.new_empty(logits.shape)


@torch.library.register_fake("alter_kernels::entropy_forward")
def _entropy_forward(logits, q):
    return tuple(_token_vector(logits) for _ in range(4))


@torch.library.register_fake("alter_kernels::entropy_backward")
def _entropy_backward(grad_entropy, logits, entropy, row_max, log_sum, power_sum, q):
    return _grad_like(logits)


@torch.library.register_fake("alter_kernels::ihl_forward")
def _ihl_forward(logits, labels, q, threshold, high_entropy_weight, ignore_index):
    loss, entropy, weight, row_max, log_sum = (_token_vector(logits) for _ in range(5))
    return loss, entropy, weight, row_max, log_sum, _token_vector(logits, torch.int32)


@torch.library.register_fake("alter_kernels::ihl_backward")
def _ihl_backward(grad_loss, logits, labels, row_max, log_sum, runner_up, ignore_index):
    return _grad_like(logits)


@torch.library.register_fake("alter_kernels::moe_align")
def _moe_align(experts, num_experts, block_m):
    numel = experts.numel()
    max_blocks = -(-(numel + num_experts * (block_m - 1)) // block_m)
    sorted_ids = experts.new_empty(max_blocks * block_m, dtype=torch.int32)
    block_expert = experts.new_empty(max_blocks, dtype=torch.int32)
    num_padded = experts.new_empty(1, dtype=torch.int32)
    return sorted_ids, block_expert, num_padded


@torch.library.register_fake("alter_kernels::gated_asym_lora_")
def _gated_asym_lora_(out, x, stacked, entropy_weight, entropy, expand, num_experts, threshold, tau_high, tau_low,
                      k_high, k_low, experts):
    return None  # adds into out in place


@torch.library.register_fake("alter_kernels::token_losses_forward")
def _token_losses_forward(logits, labels, q, threshold, high_entropy_weight, ignore_index):
    loss, entropy, weight, row_max, log_sum, power_sum = (_token_vector(logits) for _ in range(6))
    return loss, entropy, weight, row_max, log_sum, power_sum, _token_vector(logits, torch.int32)


@torch.library.register_fake("alter_kernels::token_losses_backward")
def _token_losses_backward(grad_nll, grad_ihl, grad_entropy, logits, labels, entropy, row_max, log_sum, power_sum,
                           runner_up, q, ignore_index):
    return _grad_like(logits)
