"""``EntropyTracker``: the per-model state that the AsymLoRA layers read during a forward.

One tracker is owned by a patched model (``model.alter_tracker``) and shared by all of
its ``AsymLoRALinear`` layers. It holds, for the batch being run:

- ``entropy`` [B, L] float32: each token's entropy (DESIGN §1: the entropy of the base
  model's next-token distribution at that position). Layers flatten it to [T] in the
  token order of ``x.reshape(-1, in_features)``;
- ``forced_experts`` [B] int64 or None: forced routing, every token of sample i goes to
  expert ``forced_experts[i]``;
- ``adapters_enabled``: when False the layers compute exactly their base ``nn.Linear``;
- the router logits recorded under forced routing, for :meth:`router_loss`.

How ``entropy`` is filled is ``config.entropy_source`` (see :class:`EntropyTracker`);
a forward pre-hook on the top-level model does it before any layer runs.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from alter.config import AlterConfig
from alter_kernels import fused_linear_entropy, tsallis_entropy

# Inputs of a causal LM forward that the base-model prepass repeats; the cache is left
# out on purpose: the prepass must neither read nor extend the adapted model's cache.
_PREPASS_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
_CACHE_INPUTS = ("cache", "past_key_values")  # transformers >= 5.x renames the latter


class EntropyTracker:
    """Entropy, forced routes and the adapter switch of one patched model.

    ``config.entropy_source`` decides where each forward's entropy comes from:

    - ``"prepass"``: before the model's forward, a no-grad forward of the same inputs with
      adapters off gives the final hidden states, and ``fused_linear_entropy`` with the
      output head gives the entropy (or ``tsallis_entropy`` of the logits when the head
      is not a plain bias-free linear map, e.g. Gemma 2's final-logit softcapping).
      Decoding with a non-empty KV cache is refused: use ``"lagged"``.
    - ``"precomputed"``: the caller gives it, with :meth:`precomputed` (a context) or
      :meth:`set_entropy` (until :meth:`clear_entropy`). Either also overrides the other
      sources.
    - ``"lagged"``: generation. A prompt (empty cache) is gated by a prepass; a token
      decoded with the KV cache is gated by the entropy of the distribution that
      produced it, i.e. of the previous forward's last-position logits (kept by a forward
      hook). Greedy and sampling decoding are supported; beam search reorders the batch
      between steps, which the lagged entropy cannot follow: it raises RuntimeError at
      its first reorder (``_reorder_cache``, which transformers calls when a model has it).
    """

    def __init__(self, config: AlterConfig):
        if not isinstance(config, AlterConfig):
            raise TypeError(f"EntropyTracker: config must be an AlterConfig, got {type(config).__name__}")
        self.config = config
        self.adapters_enabled = True
        self.entropy: torch.Tensor | None = None
        self.forced_experts: torch.Tensor | None = None
        # False: forced_experts are router_loss targets only; the router gates on its own.
        self.gate_forced = True
        # [B, L] bool from a 2D attention_mask: padding does not count in router_loss.
        self.token_mask: torch.Tensor | None = None
        # layer -> (router logits [T, N], forced expert [T], token mask [T] or None). Keyed
        # by layer so that a recomputed forward (gradient checkpointing) replaces its entry.
        self.router_records: dict[nn.Module, tuple] = {}
        self._entropy_given = False
        # "lagged": entropy [B] of the last forward's last-position logits (adapters on).
        self.lagged_entropy: torch.Tensor | None = None
        self._in_prepass = False
        self._hooks: list = []
        # (parameter, requires_grad) of the model before apply_alter froze it, for remove_alter.
        self.requires_grad_before: list[tuple[nn.Parameter, bool]] = []

    def __repr__(self) -> str:
        entropy = None if self.entropy is None else tuple(self.entropy.shape)
        forced = None if self.forced_experts is None else self.forced_experts.tolist()
        return (
            f"EntropyTracker(source={self.config.entropy_source!r}, adapters_enabled={self.adapters_enabled}, "
            f"entropy={entropy}, forced_experts={forced})"
        )

    # --- state set by the caller ------------------------------------------------------

    def set_entropy(self, entropy: torch.Tensor) -> None:
        """Use ``entropy`` [B, L] for every following forward, until :meth:`clear_entropy`."""
        if not isinstance(entropy, torch.Tensor):
            raise TypeError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
        if entropy.dim() != 2 or not entropy.is_floating_point():
            raise ValueError(
                f"entropy must be a float tensor of shape [batch, seq_len], got shape {tuple(entropy.shape)} "
                f"and dtype {entropy.dtype}"
            )
        self.entropy = entropy.detach().float()
        self._entropy_given = True

    def clear_entropy(self) -> None:
        self.entropy = None
        self._entropy_given = False

    @contextlib.contextmanager
    def precomputed(self, entropy: torch.Tensor):
        """Context: forwards inside it use ``entropy`` [B, L] instead of computing it."""
        saved = (self.entropy, self._entropy_given)
        self.set_entropy(entropy)
        try:
            yield self
        finally:
            self.entropy, self._entropy_given = saved

    @contextlib.contextmanager
    def forced(self, experts, gate: bool = True):
        """Context: every token of sample i goes to expert ``experts[i]`` with weight 1.
        With ``gate=False`` the router gates as at inference and ``experts`` are only the
        targets of :meth:`router_loss`."""
        if not isinstance(gate, bool):
            raise TypeError(f"forced_route: gate must be a bool, got {gate!r}")
        experts = self._check_experts(experts)
        saved = self.forced_experts, self.gate_forced
        self.forced_experts, self.gate_forced = experts, gate
        try:
            yield self
        finally:
            self.forced_experts, self.gate_forced = saved

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Context: the adapted layers compute exactly their base ``nn.Linear``."""
        saved = self.adapters_enabled
        self.adapters_enabled = False
        try:
            yield self
        finally:
            self.adapters_enabled = saved

    def _check_experts(self, experts) -> torch.Tensor:
        if isinstance(experts, torch.Tensor):
            if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
                raise TypeError(f"forced_route: experts must hold integers, got dtype {experts.dtype}")
            experts = experts.detach()
        else:
            experts = list(experts)
            if not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in experts):
                raise TypeError(f"forced_route: experts must be integers, got {experts!r}")
            experts = torch.tensor([int(e) for e in experts], dtype=torch.long)
        if experts.dim() != 1 or experts.numel() == 0:
            raise ValueError(
                f"forced_route: experts must be a non-empty 1-D sequence (one expert per sample), "
                f"got shape {tuple(experts.shape)}"
            )
        n = self.config.num_experts
        if bool(((experts < 0) | (experts >= n)).any()):
            raise ValueError(f"forced_route: expert ids must be in [0, {n}), got {experts.tolist()}")
        return experts.long()

    # --- what the layers read ----------------------------------------------------------

    def token_entropy(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The entropy of each of the layer's ``num_tokens`` tokens: [T] float32."""
        if self.entropy is None:
            if self.config.entropy_source == "precomputed":
                raise RuntimeError(
                    "entropy_source='precomputed' but no entropy was given: run the model inside "
                    "precomputed_entropy(model, entropy) or call model.alter_tracker.set_entropy(entropy)"
                )
            raise RuntimeError(
                "no token entropy for this forward: an AsymLoRALinear ran outside its patched model's "
                "forward (which fills the entropy); give it with precomputed_entropy(model, entropy)"
            )
        if self.entropy.numel() != num_tokens:
            raise ValueError(
                f"the tracked entropy has shape {tuple(self.entropy.shape)} ({self.entropy.numel()} tokens) but the "
                f"layer input has {num_tokens} tokens"
            )
        return self.entropy.reshape(-1).to(device)

    def token_experts(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The forced expert of each token, [T] int32, or None when routing is not forced."""
        if self.forced_experts is None:
            return None
        batch = self.forced_experts.numel()
        if num_tokens % batch:
            raise ValueError(
                f"forced_route: experts were given for {batch} samples but the layer input has "
                f"{num_tokens} tokens, not a multiple of {batch}"
            )
        experts = self.forced_experts.to(device=device, dtype=torch.int32)
        return experts.repeat_interleave(num_tokens // batch)

    def record_router_logits(self, layer: nn.Module, router_logits: torch.Tensor, experts: torch.Tensor) -> None:
        """Keep a layer's router logits [T, N] and forced experts [T] for :meth:`router_loss`."""
        mask = self.token_mask
        if mask is not None:
            mask = mask.reshape(-1).to(router_logits.device) if mask.numel() == experts.numel() else None
        self.router_records[layer] = (router_logits, experts.long(), mask)

    def router_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the recorded router logits against the forced experts.

        Averaged over the (non-padding) tokens of each layer, then over layers. Gradients
        reach each layer's router weight and entropy weight. ``token_mask`` ([B, L] bool,
        the forward's token shape) restricts the tokens that count further.
        """
        if not self.router_records:
            raise RuntimeError(
                "router_loss: no router logits were recorded; run a forward inside forced_route(model, experts) first"
            )
        if token_mask is not None:
            first_logits, first_experts, _ = next(iter(self.router_records.values()))
            if token_mask.numel() != first_experts.numel():
                raise ValueError(
                    f"router_loss: token_mask has {token_mask.numel()} tokens (shape {tuple(token_mask.shape)}) "
                    f"but the last forward had {first_experts.numel()}"
                )
            # One copy to the layers' device, not one per layer.
            token_mask = token_mask.reshape(-1).to(device=first_logits.device, dtype=torch.bool)
        losses = []
        for logits, experts, mask in self.router_records.values():
            if token_mask is not None:
                keep = token_mask.to(logits.device)
                mask = keep if mask is None else mask & keep
            per_token = F.cross_entropy(logits.float(), experts, reduction="none")
            if mask is None:
                losses.append(per_token.mean())
            else:
                losses.append((per_token * mask).sum() / mask.sum().clamp_min(1))
        return torch.stack(losses).mean()

    # --- hooks on the top-level model ----------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Register the hooks that fill the entropy before each forward of ``model``."""
        if self._hooks:
            raise RuntimeError("EntropyTracker.attach: the tracker is already attached to a model")
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
            _BeamReorderGuard(model, self),
        ]

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_prepass:
            return
        self.router_records.clear()
        inputs = _named_inputs(model, args, kwargs)
        tokens = _token_input(inputs)
        batch, seq_len = tokens.shape[0], tokens.shape[1]
        mask = inputs.get("attention_mask")
        is_2d_mask = isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, seq_len)
        self.token_mask = mask.bool() if is_2d_mask else None
        if self.forced_experts is not None and self.forced_experts.numel() != batch:
            raise ValueError(
                f"forced_route: experts were given for {self.forced_experts.numel()} samples but the batch has {batch}"
            )
        # Move what the caller gave to the input's device once per forward, not once per
        # layer: a host-to-device copy blocks the host (hundreds of layers in a large model).
        if self.forced_experts is not None:
            self.forced_experts = self.forced_experts.to(tokens.device)
        if self._entropy_given:
            if tuple(self.entropy.shape) != (batch, seq_len):
                raise ValueError(
                    f"precomputed entropy has shape {tuple(self.entropy.shape)} but the input has shape "
                    f"{(batch, seq_len)} (batch, seq_len)"
                )
            self.entropy = self.entropy.to(tokens.device)
            return
        if not self.adapters_enabled:
            return
        source = self.config.entropy_source
        if source == "precomputed":
            raise RuntimeError(
                "entropy_source='precomputed' but no entropy was given: run the model inside "
                "precomputed_entropy(model, entropy) or call model.alter_tracker.set_entropy(entropy)"
            )
        cached = _cache_length(inputs)
        if cached and source == "lagged":
            lagged = self.lagged_entropy
            if seq_len != 1 or lagged is None or lagged.numel() != batch:
                raise RuntimeError(
                    "entropy_source='lagged' gates one decoded token per sample with the entropy of the previous "
                    f"forward's last logits; got {seq_len} new tokens for {batch} samples after a forward that "
                    f"left {None if lagged is None else lagged.numel()} entropies"
                )
            self.entropy = lagged.reshape(batch, 1)
            return
        if cached:
            raise RuntimeError(
                "entropy_source='prepass' cannot gate tokens decoded with a non-empty KV cache (the base model's "
                "cache is not kept); use entropy_source='lagged' for generation"
            )
        self.entropy = self._base_entropy(model, inputs)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._in_prepass or self.config.entropy_source != "lagged":
            return
        logits = _output_logits(output)
        with torch.no_grad():
            # No host sync in a decode step (CUDA-graph capture): a model's logits always
            # have a finite entry, and the layers' routing runs unchecked too.
            self.lagged_entropy = tsallis_entropy(
                logits[:, -1].detach(), self.config.tsallis_q, backend=self.config.backend, check_finite=False
            )

    @contextlib.contextmanager
    def _base_model_pass(self, model: nn.Module):
        """No grad, adapters off, eval mode (no dropout), and no re-entry of the hooks."""
        training = [(m, m.training) for m in model.modules()]
        saved = self.adapters_enabled
        self._in_prepass, self.adapters_enabled = True, False
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self._in_prepass, self.adapters_enabled = False, saved
            for module, mode in training:
                module.training = mode

    def _base_entropy(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """Entropy [B, L] of the base model's next-token distributions for ``inputs``."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise RuntimeError(
                f"entropy_source={self.config.entropy_source!r} needs a causal LM with an output head "
                f"(get_output_embeddings()); {type(model).__name__} has none: use entropy_source='precomputed'"
            )
        head = getattr(head, "base_layer", head)  # an adapted head: its frozen base
        mask = inputs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise RuntimeError(
                "the entropy prepass needs a 2D attention_mask [batch, seq_len] (a 4D or cache-shaped mask "
                "cannot be replayed without the cache)"
            )
        base_inputs = {k: inputs[k] for k in _PREPASS_INPUTS if inputs.get(k) is not None}
        q, backend = self.config.tsallis_q, self.config.backend
        with self._base_model_pass(model):
            if _logits_are_plain_linear(model, head):
                decoder = getattr(model, model.base_model_prefix)
                hidden = decoder(**base_inputs, use_cache=False).last_hidden_state
                entropy = fused_linear_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, q, backend=backend)
                return entropy.reshape(hidden.shape[:-1])
            logits = model(**base_inputs, use_cache=False).logits
            return tsallis_entropy(logits, q, backend=backend)


class _BeamReorderGuard:
    """An instance ``_reorder_cache`` on the patched model: transformers' beam search calls
    it to reorder the KV cache between steps, where ``"lagged"`` entropy would gate each
    beam's next token with another beam's entropy. It raises then; otherwise it reorders
    as the model would. ``remove()`` takes it off, like a hook handle."""

    def __init__(self, model: nn.Module, tracker: EntropyTracker):
        self.model, self.tracker = model, tracker
        self.original = getattr(model, "_reorder_cache", None)
        model._reorder_cache = self

    def __call__(self, cache, beam_idx):
        if self.tracker.config.entropy_source == "lagged" and self.tracker.adapters_enabled:
            raise RuntimeError(
                "entropy_source='lagged' does not support beam search (num_beams > 1): reordering the beams "
                "would gate each token with another beam's entropy; decode greedily or by sampling, or use "
                "entropy_source='prepass' with use_cache=False"
            )
        if self.original is not None:
            return self.original(cache, beam_idx)
        cache.reorder_cache(beam_idx)
        return cache

    def remove(self) -> None:
        if self.model.__dict__.get("_reorder_cache") is self:
            del self.model.__dict__["_reorder_cache"]


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward's arguments by name (positional ones bound to the signature)."""
    if not args:
        inputs = dict(kwargs)
    else:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
        inputs = {}
        for name, value in bound.arguments.items():
            param = bound.signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(value)
            else:
                inputs[name] = value
    return inputs


def _token_input(inputs: dict) -> torch.Tensor:
    """The forward's ``input_ids`` [B, L] or else ``inputs_embeds`` [B, L, D]."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(inputs.get(key), torch.Tensor):
            return inputs[key]
    raise ValueError("the patched model needs input_ids or inputs_embeds to know its tokens")


def _output_logits(output) -> torch.Tensor:
    """The logits [B, L, V] of a causal LM's output; a ``return_dict=False`` tuple starts
    with the loss when labels were given, so take its first 3-D tensor."""
    if hasattr(output, "logits"):
        return output.logits
    return next(t for t in output if isinstance(t, torch.Tensor) and t.dim() == 3)


def _cache_length(inputs: dict) -> int:
    for key in _CACHE_INPUTS:
        cache = inputs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def _logits_are_plain_linear(model: nn.Module, head: nn.Module) -> bool:
    """True when logits = head(final hidden states) exactly, so the fused entropy applies."""
    config = getattr(model, "config", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and hasattr(model, "base_model_prefix")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
        and getattr(config, "logits_scaling", None) in (None, 1, 1.0)
    )
