"""RMU, representation misdirection (Li et al., 2024, "The WMDP Benchmark: Measuring and
Reducing Malicious Use With Unlearning"): the hidden state after one decoder layer is
steered to a fixed random direction on forget tokens and kept at the starting model's on
retain tokens.

    loss = gamma * mean_i mean_t mean_d (h_itd - c u_d)^2 + alpha * mean_i mean_t mean_d (h_itd - h_ref_itd)^2

over each sample's labelled tokens; u is uniform in [0, 1)^D normalized to 1, c the
steering coefficient.
"""
import contextlib

import torch

from alter.data import IGNORE_INDEX
from alter.methods import register
from alter.methods.base import Method
from alter.methods.retain import samples


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
    """The steered layer: 7, open-unlearning's (``model.layers.7``, set for Llama-3.2-1B's 16
    layers), when the model has 8 layers or more; else the layer at the same depth,
    ``floor(7 * num_layers / 16)`` (a 4-layer model steers layer 1)."""
    return 7 if num_layers >= 8 else 7 * num_layers // 16


@contextlib.contextmanager
def layer_output(layer: torch.nn.Module):
    """Yields a list that receives the hidden state ``[B, L, D]`` that ``layer`` (a decoder
    layer) outputs in the forwards run inside the context (its residual stream, before any
    final norm)."""
    outputs = []
    handle = layer.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield outputs
    finally:
        handle.remove()


@register
class RMU(Method):
    """On adapters the steering still acts on the frozen base's hidden state, through the
    adapters of the layers up to the steered one (those above it get no gradient): a
    meaningful pair, as on every weight."""

    name = "rmu"
    needs_reference = True
    # open-unlearning configs/trainer/RMU.yaml: module_regex model\.layers\.7 (layer -1 here:
    # rmu_layer's choice by depth), retain_loss_type EMBED_DIFF, every parameter trained.
    defaults = {"steering_coeff": 2.0, "alpha": 1.0, "gamma": 1.0, "layer": -1}

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        text = model.config.get_text_config()
        layers = text.num_hidden_layers
        self.layer = rmu_layer(layers) if self.hparams["layer"] < 0 else self.hparams["layer"]
        if self.layer >= layers:
            raise ValueError(f"rmu: layer {self.layer} of a {layers}-layer model; method_args layer must be one of "
                             f"0..{layers - 1} (or -1: chosen by depth)")
        self.control = steering_vector(text.hidden_size, self.hparams["steering_coeff"], self.args.seed)
        return forget_examples, retain_examples

    def steered(self, model) -> torch.nn.Module:
        """The steered decoder layer of ``model`` (unwrapped: the trained or the reference model)."""
        return model.get_decoder().layers[self.layer]

    def loss(self, model, forget, retain):
        hp = self.hparams
        with layer_output(self.steered(self.model)) as hidden:
            out = self.outputs(model, forget, True)
        # The tokens of labels != -100, not shifted (activations at the tokens, as open-unlearning).
        forget_loss = rmu_loss(hidden[0], self.control.to(hidden[0].device), forget["labels"] != IGNORE_INDEX)
        with layer_output(self.steered(self.model)) as hidden:
            retain_out = self.outputs(model, retain, False)
        # The starting model: the frozen copy under full, the same model with its adapters off on adapters.
        reference_model = self.model if self.reference_model is None else self.reference_model
        with layer_output(self.steered(reference_model)) as reference:
            self.reference_outputs(model, retain)
        retain_loss = rmu_loss(hidden[0], reference[0], retain["labels"] != IGNORE_INDEX)
        loss = (hp["gamma"] * self.global_mean(forget_loss, samples(forget))
                + hp["alpha"] * self.global_mean(retain_loss, samples(retain)))
        if self.distributed:
            # The layers above the steered one and the head get no gradient: through the
            # output every parameter takes part in the backward (DDP waits for each one).
            loss = loss + 0.0 * (out.logits.sum() + retain_out.logits.sum())
        return loss, {"forget": forget_loss.detach(), "retain": retain_loss.detach()}
