"""RMU, representation misdirection (Li et al., 2024, "The WMDP Benchmark: Measuring and
Reducing Malicious Use With Unlearning"): the hidden state after one decoder layer is
steered to a fixed random direction on forget tokens and kept at the starting model's on
retain tokens.

    loss = gamma * mean_i mean_t mean_d (h_itd - c u_d)^2 + alpha * mean_i mean_t mean_d (h_itd - h_ref_itd)^2

over each sample's labelled tokens; u is uniform in [0, 1)^D normalized to 1, c the
steering coefficient.
"""
import torch


def rmu_loss(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the mean over their masked tokens of the mean squared
    difference over the hidden dimension. ``hidden`` ``[B, L, D]``, ``target``
    broadcastable to it (``[D]`` for the steering vector, ``[B, L, D]`` for reference
    activations, no gradient), ``mask`` ``[B, L]`` bool. Computed in float32 (float64
    for float64 inputs)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    per_token = ((hidden.to(dtype) - target.to(dtype)) ** 2).mean(-1)
    per_sample = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_sample.mean()


def steering_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """``coeff * u / ||u||``, u uniform in [0, 1)^dim from a generator seeded with ``seed``:
    float32 ``[dim]``, the same for every step of a run."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed))
    return coeff * u / u.norm()


def rmu_layer(num_layers: int) -> int:
    """The steered layer: 7, open-unlearning's for Llama-3.2-1B (16 layers), when the model
    has more than 8 layers; else the layer at the same depth, ``floor(7 * num_layers / 16)``.
    A model with 8 layers gets layer 3, not 7: its hidden state after the last layer comes
    back after the final norm (``output_hidden_states``), no longer a residual stream."""
    return 7 if num_layers > 8 else 7 * num_layers // 16
