"""Per-call state of a patched model: what its AsymLoRA layers read during one forward.

A patched model owns one :class:`EntropyTracker` (``model.alter_tracker``), shared by all
of its ``AsymLoRALinear`` layers. The tracker holds only what the *caller* set (the
config, entropy given with :meth:`EntropyTracker.precomputed`, forced routes, the adapter
switch). Each forward of the model turns that into a :class:`CallState`, an immutable
value built by a forward pre-hook before any layer runs and dropped when the call ends:

- ``entropy`` [B, L] float32: each token's entropy (DESIGN §1: the entropy of the base
  model's next-token distribution at that position), on the input's device. Layers
  flatten it to [T] in the token order of ``x.reshape(-1, in_features)``. None with
  ``entropy_unread``: no layer of a route-gated call reads it, so no base-model pass ran;
- ``forced_experts`` [B] int64 or None: every token of sample i goes to expert
  ``forced_experts[i]``;
- ``token_route`` [B, L] int32 or None: under ``routing="sequence"``, each token's expert
  from the route keys (:mod:`~alter.adapters.sequence_route`), which gates every layer
  unless forced experts gate;
- ``adapters_enabled``: when False the layers compute exactly their base ``nn.Linear``;
- ``router_records``: the router logits the layers record under forced routing, for
  :func:`~alter.adapters.patching.router_loss`;
- ``frozen_experts`` / ``adapters_frozen``: the B experts (or A and all of B) to which
  this call's output gives a zero gradient, so that one loss can sum calls that train different
  parameters (a method's forget, retain and router-only passes).

The layers read the state of the call they run in, and nothing else. Gradient
checkpointing recomputes a layer's forward during backward, after later forwards may have
run: the checkpoint function of a Hugging Face model is wrapped so that the recompute runs
under the state of its own call (:class:`StatefulCheckpoint`). A layer run outside any
call (called on its own) builds its state from what the caller gave, and raises when that
is not enough; it never reuses an earlier call's state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers

import torch
from torch import nn

from alter.adapters.hooks import (BeamReorder, StatefulCheckpoint, base_model_entropy, evaluating, feeds_cache,
                                  input_cache, named_inputs, output_cache, output_logits, token_input)
from alter.adapters.cache_link import CacheLink, cache_length
from alter.adapters.lagged import LaggedEntropy
from alter.adapters.sequence_route import SequenceRouting
from alter.config import AlterConfig
from alter_kernels import tsallis_entropy


def _reordered_cache(cache, beam_idx: torch.Tensor):
    cache.reorder_cache(beam_idx)  # in place
    return cache


@dataclasses.dataclass(frozen=True)
class CallState:
    """What the adapted layers read during one forward of a patched model (see the module doc).

    ``router_records`` maps layer -> (router logits [T, N], forced expert [T] int64, token
    mask [T] bool or None); keyed by layer so that a checkpointed recompute of the same
    call replaces its own entry. ``prepass``: the base-model pass that computes the entropy
    (adapters off, the model's hooks do not re-enter). ``routing``: what every layer of
    the call derives from the entropy alone, computed by the first layer that needs it.
    """

    adapters_enabled: bool = True
    entropy: torch.Tensor | None = None
    forced_experts: torch.Tensor | None = None
    gate_forced: bool = True
    token_route: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    router_records: dict = dataclasses.field(default_factory=dict)
    frozen_experts: tuple[int, ...] = ()
    adapters_frozen: bool = False
    prepass: bool = False
    routing: dict = dataclasses.field(default_factory=dict)
    entropy_unread: bool = False


class EntropyTracker:
    """The caller's settings of one patched model, and the per-call state built from them.

    ``config.entropy_source`` decides where each forward's entropy comes from:

    - ``"prepass"``: before the model's forward, a no-grad forward of the same inputs with
      adapters off gives the final hidden states, and ``fused_linear_entropy`` with the
      output head gives the entropy (or ``tsallis_entropy`` of the logits when the head
      is not a plain bias-free linear map, e.g. Gemma 2's final-logit softcapping).
      A forward that returns a KV cache (generation) keeps the base model's own cache
      too, so that each decoded token's prepass runs that token alone: exact, at the
      cost of a second (base) decode step per token and a second KV cache.
    - ``"precomputed"``: the caller gives it, with :meth:`precomputed` (a context) or
      :meth:`set_entropy` (until :meth:`clear_entropy`). Either also overrides the other
      sources.
    - ``"lagged"``: generation. A prompt (empty cache) is gated by a prepass; a token
      decoded with the KV cache is gated by the entropy of the distribution that
      produced it, i.e. of the last-position logits of the forward that returned its KV
      cache (``lagged``, :class:`~alter.adapters.lagged.LaggedEntropy`).

    ``last_call`` is the :class:`CallState` of the last completed forward, for
    :func:`~alter.adapters.patching.router_loss` and for inspection; no layer reads it.
    """

    def __init__(self, config: AlterConfig):
        if not isinstance(config, AlterConfig):
            raise TypeError(f"EntropyTracker: config must be an AlterConfig, got {type(config).__name__}")
        self.config = config
        self.adapters_enabled = True
        # Caller-given: entropy [B, L] (set_entropy / precomputed) and forced routes [B].
        self.given_entropy: torch.Tensor | None = None
        self.forced_experts: torch.Tensor | None = None
        # False: forced_experts are router_loss targets only; the router gates on its own.
        self.gate_forced = True
        # Caller-given: the experts whose B (or, adapters_frozen, A and B) get no gradient.
        self.frozen_experts: tuple[int, ...] = ()
        self.adapters_frozen = False
        self.lagged = LaggedEntropy()
        self.last_call: CallState | None = None
        # "prepass" with a KV cache: the base model's cache of the adapted cache's tokens,
        # linked to the latter, and while its forward runs.
        self._base_cache, self._pending_base_cache = CacheLink(release=True), None
        self.sequence_routing = SequenceRouting(config)
        # The states of the calls running now (a prepass runs inside its model's call).
        self._calls: list[CallState] = []
        self._hooks: list = []
        self._checkpointing_modules: list[nn.Module] = []
        # (parameter, requires_grad) of the model before apply_alter froze it, for remove_alter.
        self.requires_grad_before: list[tuple[nn.Parameter, bool]] = []

    def __repr__(self) -> str:
        entropy = None if self.given_entropy is None else tuple(self.given_entropy.shape)
        forced = None if self.forced_experts is None else self.forced_experts.tolist()
        return (f"EntropyTracker(source={self.config.entropy_source!r}, adapters_enabled={self.adapters_enabled}, "
                f"given_entropy={entropy}, forced_experts={forced})")

    # --- state set by the caller ------------------------------------------------------

    def set_entropy(self, entropy: torch.Tensor) -> None:
        """Use ``entropy`` [B, L] for every following forward, until :meth:`clear_entropy`."""
        if not isinstance(entropy, torch.Tensor):
            raise TypeError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
        if entropy.dim() != 2 or not entropy.is_floating_point():
            raise ValueError(f"entropy must be a float tensor of shape [batch, seq_len], got shape "
                             f"{tuple(entropy.shape)} and dtype {entropy.dtype}")
        self.given_entropy = entropy.detach().float()

    def clear_entropy(self) -> None:
        self.given_entropy = None

    @contextlib.contextmanager
    def precomputed(self, entropy: torch.Tensor):
        """Context: forwards inside it use ``entropy`` [B, L] instead of computing it."""
        saved = self.given_entropy
        self.set_entropy(entropy)
        try:
            yield self
        finally:
            self.given_entropy = saved

    @contextlib.contextmanager
    def forced(self, experts, gate: bool = True):
        """Context: every token of sample i goes to expert ``experts[i]`` with weight 1.
        With ``gate=False`` the router gates as at inference and ``experts`` are only the
        targets of :func:`~alter.adapters.patching.router_loss`."""
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
    def frozen(self, experts=None):
        """Context: forwards inside it give no gradient to the B of ``experts`` (a sequence
        of expert ids), or with ``experts=None`` to lora_A and every B; the values, and the
        routers' gradients, are unchanged."""
        saved = self.frozen_experts, self.adapters_frozen
        if experts is None:
            self.adapters_frozen = True
        else:
            ids = tuple(int(e) for e in experts)
            if any(not 0 <= e < self.config.num_experts for e in ids):
                raise ValueError(f"frozen_adapters: expert ids must be in [0, {self.config.num_experts}), got {ids}")
            self.frozen_experts = tuple(sorted(set(self.frozen_experts) | set(ids)))
        try:
            yield self
        finally:
            self.frozen_experts, self.adapters_frozen = saved

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

    def call_state(self) -> CallState:
        """The state of the call a layer runs in; outside any call (a layer called on its
        own), a fresh state from what the caller gave."""
        if self._calls:
            return self._calls[-1]
        state = self._given_state()
        self.last_call = state  # router_loss after a layer called on its own
        return state

    def _given_state(self, **computed) -> CallState:
        """A call's state from what the caller set, with ``computed`` fields replacing them."""
        given = dict(adapters_enabled=self.adapters_enabled, entropy=self.given_entropy,
                     forced_experts=self.forced_experts, gate_forced=self.gate_forced,
                     frozen_experts=self.frozen_experts, adapters_frozen=self.adapters_frozen)
        return CallState(**{**given, **computed})

    def token_entropy(self, state: CallState, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The entropy of the layer's ``num_tokens`` tokens under ``state``: [T] float32 (None if unread)."""
        entropy = state.entropy
        if entropy is None and state.entropy_unread:
            return None
        if entropy is None:
            if self.config.entropy_source == "precomputed":
                raise RuntimeError(
                    "entropy_source='precomputed' but no entropy was given: run the model inside "
                    "precomputed_entropy(model, entropy) or call model.alter_tracker.set_entropy(entropy)"
                )
            raise RuntimeError(
                "no token entropy for this forward: an AsymLoRALinear ran outside its patched model's "
                "forward (which computes the entropy of each call); give it with precomputed_entropy(model, entropy)"
            )
        if entropy.numel() != num_tokens:
            raise ValueError(
                f"the given entropy has shape {tuple(entropy.shape)} ({entropy.numel()} tokens) but the "
                f"layer input has {num_tokens} tokens"
            )
        return entropy.reshape(-1).to(device)

    @staticmethod
    def token_experts(state: CallState, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The forced expert of each token under ``state``, [T] int32, or None when routing is not forced."""
        forced = state.forced_experts
        if forced is None:
            return None
        batch = forced.numel()
        if num_tokens % batch:
            raise ValueError(
                f"forced_route: experts were given for {batch} samples but the layer input has "
                f"{num_tokens} tokens, not a multiple of {batch}"
            )
        return forced.to(device=device, dtype=torch.int32).repeat_interleave(num_tokens // batch)

    @staticmethod
    def token_route(state: CallState, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The sequence route of each of the layer's tokens under ``state``, [T] int32, or None."""
        route = state.token_route
        if route is None:
            return None
        if route.numel() != num_tokens:
            raise ValueError(f"routing='sequence': the call's route has {route.numel()} tokens but the layer input "
                             f"has {num_tokens}")
        return route.reshape(-1).to(device=device, dtype=torch.int32)

    @staticmethod
    def record_router_logits(state: CallState, layer: nn.Module, router_logits: torch.Tensor,
                             experts: torch.Tensor) -> None:
        """Keep a layer's router logits [T, N] and forced experts [T] for ``router_loss``."""
        mask = state.token_mask
        if mask is not None:
            mask = mask.reshape(-1).to(router_logits.device) if mask.numel() == experts.numel() else None
        state.router_records[layer] = (router_logits, experts.long(), mask)

    @contextlib.contextmanager
    def running(self, state: CallState):
        """Context: layers run under ``state`` (a call, its checkpointed recompute, the prepass)."""
        self._calls.append(state)
        try:
            yield state
        finally:
            self._calls.pop()

    # --- hooks on the top-level model ----------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Register the hooks that build each forward's state of ``model``."""
        if self._hooks:
            raise RuntimeError("EntropyTracker.attach: the tracker is already attached to a model")
        # always_call: a forward that raises still ends its call.
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
            BeamReorder(model, self),
        ]
        self._checkpointing_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        for module in self._checkpointing_modules:
            checkpoint = module.__dict__.get("_gradient_checkpointing_func")
            if isinstance(checkpoint, StatefulCheckpoint):
                module._gradient_checkpointing_func = checkpoint.checkpoint
        self._hooks, self._checkpointing_modules = [], []

    def _in_prepass(self) -> bool:
        return bool(self._calls) and self._calls[-1].prepass

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_prepass():
            return
        # Open the call first: the post-hook (always called) closes it even when building
        # its state raises here.
        self._calls.append(CallState(adapters_enabled=False))
        inputs = named_inputs(model, args, kwargs)
        tokens = token_input(inputs)
        batch, seq_len = tokens.shape[0], tokens.shape[1]
        mask = inputs.get("attention_mask")
        is_2d_mask = isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, seq_len)
        forced = self.forced_experts
        if forced is not None and forced.numel() != batch:
            raise ValueError(f"forced_route: experts were given for {forced.numel()} samples but the batch has {batch}")
        # Move what the caller gave to the input's device once per forward, not once per
        # layer: a host-to-device copy blocks the host (hundreds of layers in a large model).
        if forced is not None:
            forced = forced.to(tokens.device)
        route = self.sequence_routing.call_route(inputs, tokens) if self.config.routing == "sequence" \
            and self.adapters_enabled else None
        # The entropy feeds the routers and A's gradient mask: a route-gated call without autograd
        # or forced experts reads neither, so it skips the base-model pass (half a prefill's cost).
        # A prepass that feeds the base model's KV cache runs: a later call may read that cache.
        unread = (route is not None and forced is None and self.given_entropy is None and not torch.is_grad_enabled()
                  and not (self.config.entropy_source == "prepass" and feeds_cache(model, inputs)))
        entropy = None if unread else self._call_entropy(model, inputs, batch, seq_len, tokens.device)
        self._calls[-1] = self._given_state(entropy=entropy, forced_experts=forced, token_route=route,
                                            token_mask=mask.bool() if is_2d_mask else None, entropy_unread=unread)
        if model.training and torch.is_grad_enabled():
            self._wrap_checkpointing()

    def _call_entropy(self, model: nn.Module, inputs: dict, batch: int, seq_len: int, device) -> torch.Tensor | None:
        """The entropy [B, L] of this call, on ``device`` (None with adapters off)."""
        given = self.given_entropy
        if given is not None:
            if tuple(given.shape) != (batch, seq_len):
                raise ValueError(
                    f"precomputed entropy has shape {tuple(given.shape)} but the input has shape "
                    f"{(batch, seq_len)} (batch, seq_len)"
                )
            return given.to(device)
        if not self.adapters_enabled:
            return None
        source = self.config.entropy_source
        if source == "precomputed":
            raise RuntimeError(
                "entropy_source='precomputed' but no entropy was given: run the model inside "
                "precomputed_entropy(model, entropy) or call model.alter_tracker.set_entropy(entropy)"
            )
        _, cache = input_cache(inputs)
        cached = 0 if cache is None else cache_length(cache)
        if cached and source == "lagged":
            return self.lagged.for_step(cache, cached, batch, seq_len)
        base_cache = self._base_cache_of(cache, cached) if cached else None
        keep = source == "prepass" and feeds_cache(model, inputs)  # "lagged" never reads it
        entropy, base_cache = base_model_entropy(model, inputs, self.config, self._base_model_pass(model),
                                                 base_cache, keep_cache=keep)
        self._pending_base_cache = base_cache  # tied to the cache this forward returns
        return entropy

    def _base_cache_of(self, cache, cached: int):
        """The base model's KV cache that shadows the adapted model's ``cache`` (prepass)."""
        base_cache = self._base_cache.get(cache, cached)
        if base_cache is None:
            raise RuntimeError(
                "entropy_source='prepass' decodes with the base model's own KV cache, filled when the cached tokens "
                "ran through this patched model (as generate() does): "
                f"{self._base_cache.mismatch(cache, cached)}; run the prompt through the "
                "patched model with use_cache=True")
        return base_cache

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._in_prepass():
            return
        self.last_call = self._calls.pop()
        pending, self._pending_base_cache = self._pending_base_cache, None
        returned = None if output is None else output_cache(output)
        if returned is not None and pending is not None:  # the base cache goes when the adapted model's cache goes
            self._base_cache.set(returned, pending)
        self.sequence_routing.call_ended(returned)
        if returned is None or self.config.entropy_source != "lagged":  # None: no cache, or the forward raised
            return
        with torch.no_grad():
            # No host sync in a decode step (CUDA-graph capture): a model's logits always
            # have a finite entry, and the layers' routing runs unchecked too.
            self.lagged.link(returned, tsallis_entropy(output_logits(output)[:, -1].detach(), self.config.tsallis_q,
                                                       backend=self.config.backend, check_finite=False))

    def reorder(self, cache, beam_idx: torch.Tensor) -> None:
        """Follow beam search's in-place reorder of ``cache``'s batch [B] (``hooks.BeamReorder``):
        the routes carried in it, its lagged entropy and its prepass's base-model cache."""
        self.sequence_routing.reorder(cache, beam_idx)
        self.lagged.reorder(cache, beam_idx)
        self._base_cache.reorder(cache, beam_idx, _reordered_cache)

    def _wrap_checkpointing(self) -> None:
        """Make each checkpointed block of the model recompute under its own call's state
        (Hugging Face sets ``_gradient_checkpointing_func`` when checkpointing is enabled,
        possibly after the model was patched)."""
        for module in self._checkpointing_modules:
            checkpoint = getattr(module, "_gradient_checkpointing_func", None)
            if checkpoint is not None and not isinstance(checkpoint, StatefulCheckpoint):
                module._gradient_checkpointing_func = StatefulCheckpoint(checkpoint, self)

    @contextlib.contextmanager
    def _base_model_pass(self, model: nn.Module):
        """No grad, adapters off, eval mode (no dropout), and no re-entry of the hooks."""
        with evaluating(model), self.running(CallState(adapters_enabled=False, prepass=True)):
            yield
