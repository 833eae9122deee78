"""Entropy-gated top-k routing and token grouping by expert.

``route``: router logits + per-token entropy -> (weights [T, K] f32, experts [T, K] i32).
``moe_align``: groups the (token, slot) pairs of ``experts`` by expert for the grouped
AsymLoRA matmuls.
"""
from __future__ import annotations

import torch


def moe_align_eager(experts: torch.Tensor, num_experts: int, block_m: int):
    """Eager reference of :func:`moe_align`.

    experts: [T, K] int32, values in [-1, num_experts). Returns
      sorted_ids   [ceil((T·K + N·(block_m − 1)) / block_m) · block_m] int32: flat slot
                   indices t·K + j grouped by
                   expert (ascending within a group), each group padded to a multiple of
                   block_m with T·K; entries past num_padded are T·K too;
      block_expert [len(sorted_ids) // block_m] int32: expert of each block, −1 past
                   num_padded;
      num_padded   [1] int32: used length of sorted_ids.
    Slots with expert −1 are left out.
    """
    numel = experts.numel()
    flat = experts.reshape(-1).long()
    max_padded = numel + num_experts * (block_m - 1)
    max_blocks = -(-max_padded // block_m)
    sorted_ids = torch.full((max_blocks * block_m,), numel, dtype=torch.int32, device=experts.device)
    block_expert = torch.full((max_blocks,), -1, dtype=torch.int32, device=experts.device)
    offset = 0
    for e in range(num_experts):
        slots = (flat == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        padded = -(-slots.numel() // block_m) * block_m
        sorted_ids[offset : offset + slots.numel()] = slots.to(torch.int32)
        block_expert[offset // block_m : (offset + padded) // block_m] = e
        offset += padded
    num_padded = torch.tensor([offset], dtype=torch.int32, device=experts.device)
    return sorted_ids, block_expert, num_padded


def route(*args, **kwargs):
    raise NotImplementedError


def moe_align(experts, num_experts, block_m, backend=None):
    return moe_align_eager(experts, num_experts, block_m)
