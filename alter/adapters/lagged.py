"""``entropy_source="lagged"``: a decoded token is gated by the entropy of the distribution
it was chosen from, the last-position logits of the forward that returned its KV cache,
linked to that cache (:class:`~alter.adapters.cache_link.CacheLink`)."""
from __future__ import annotations

import torch

from alter.adapters.cache_link import CacheLink


class LaggedEntropy:
    """The lagged entropy [B] float32 of a patched model, linked to one KV cache."""

    def __init__(self):
        self._link = CacheLink()

    @property
    def entropy(self) -> torch.Tensor | None:
        """The entropy [B] the next decode step on the linked cache reads (None: no link)."""
        return self._link.payload

    def link(self, cache, entropy: torch.Tensor) -> None:
        """Gate the next decode step on ``cache`` with ``entropy`` [B]: what a forward that
        returns ``cache`` records; a caller driving its own decode loop (a CUDA graph on a
        copy of the cache) sets it."""
        self._link.set(cache, entropy)

    def for_step(self, cache, cached: int, batch: int, seq_len: int) -> torch.Tensor:
        """The entropy [B, 1] of a decode step on ``cache`` (``cached`` tokens in it)."""
        entropy = self._link.get(cache, cached)
        if entropy is None:
            raise RuntimeError(
                "entropy_source='lagged' gates a decoded token with the entropy of the logits it was chosen from, "
                f"recorded by the forward that returned its KV cache; {self._link.mismatch(cache, cached)}. "
                "Run forwards between decode steps with use_cache=False, or give a custom decode loop's entropy "
                "with model.alter_tracker.lagged.link(cache, entropy)")
        if seq_len != 1 or entropy.numel() != batch:
            raise RuntimeError(
                "entropy_source='lagged' gates one decoded token per sample with the entropy of the previous "
                f"forward's last logits; got {seq_len} new tokens for {batch} samples after a forward that "
                f"left {entropy.numel()} entropies")
        return entropy.reshape(batch, 1)

    def reorder(self, cache, beam_idx: torch.Tensor) -> None:
        """Follow beam search's in-place reorder of ``cache``'s batch."""
        self._link.reorder(cache, beam_idx, lambda entropy, idx: entropy[idx.to(entropy.device)])
