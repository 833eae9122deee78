"""``entropy_source="lagged"``: a decoded token is gated by the entropy of the distribution
it was chosen from, the last-position logits of the forward that returned its KV cache.
The entropy is linked to that cache and its length, as the sequence route links its
carry and the prepass the base model's cache, so that a step on another cache (another
forward ran in between) or on a cropped one raises instead of reading the wrong entropy."""
from __future__ import annotations

import weakref

import torch


class LaggedEntropy:
    """The lagged entropy [B] float32 of a patched model, linked to one KV cache."""

    def __init__(self):
        self._linked: tuple | None = None  # (weakref to a KV cache, its length, entropy [B])

    @property
    def entropy(self) -> torch.Tensor | None:
        """The entropy [B] the next decode step on the linked cache reads (None: no link)."""
        return None if self._linked is None else self._linked[2]

    def link(self, cache, entropy: torch.Tensor) -> None:
        """Gate the next decode step on ``cache`` with ``entropy`` [B]: what a forward that
        returns ``cache`` records; a caller driving its own decode loop (a CUDA graph) may
        set it. No host sync for a dynamic cache (its length is a shape)."""
        self._linked = (weakref.ref(cache), int(cache.get_seq_length()), entropy)

    def for_step(self, cache, cached: int, batch: int, seq_len: int) -> torch.Tensor:
        """The entropy [B, 1] of a decode step on ``cache`` (``cached`` tokens in it)."""
        linked = self._linked
        if linked is None or linked[0]() is not cache or linked[1] != cached:
            raise RuntimeError(
                "entropy_source='lagged' gates a decoded token with the entropy of the logits it was chosen from, "
                f"recorded by the forward that returned its KV cache; this cache ({cached} tokens) is not the one "
                "the model's last forward with a cache returned (another forward ran in between, or it was cropped "
                "or filled elsewhere): finish one cache's decode before another, or use entropy_source='prepass'")
        entropy = linked[2]
        if seq_len != 1 or entropy.numel() != batch:
            raise RuntimeError(
                "entropy_source='lagged' gates one decoded token per sample with the entropy of the previous "
                f"forward's last logits; got {seq_len} new tokens for {batch} samples after a forward that "
                f"left {entropy.numel()} entropies")
        return entropy.reshape(batch, 1)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow beam search's in-place reorder of the linked cache's batch."""
        if self._linked is not None:
            ref, length, entropy = self._linked
            self._linked = (ref, length, entropy[beam_idx.to(entropy.device)])
