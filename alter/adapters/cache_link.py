"""State that follows one KV cache across calls: the sequence route's carry, the lagged
entropy, the prepass's base-model cache. Each is linked to the cache object the forward
returned and to that cache's length, so that a step on another cache, or on the same
cache after it was cropped (assisted decoding) or grown elsewhere, is told apart from
its continuation instead of reading the wrong state."""
from __future__ import annotations

import weakref
from typing import Any, Callable


def cache_length(cache) -> int:
    """The tokens ``cache`` holds. A shape for a dynamic cache (no host sync); a static
    cache keeps it in a tensor, read on the host here (its decode steps sync anyway:
    the layers need the count to mask)."""
    return int(cache.get_seq_length())


class CacheLink:
    """A payload linked to one KV cache and the length it had when linked. ``release``:
    drop the payload when the cache is garbage collected (a base-model cache's memory);
    otherwise it stays readable (``payload``) but continues no cache."""

    def __init__(self, release: bool = False):
        self._link: tuple | None = None  # (weakref to the cache, its length, payload)
        self._release = release

    @property
    def payload(self) -> Any:
        """The linked payload (None: no link)."""
        return None if self._link is None else self._link[2]

    def set(self, cache, payload: Any) -> None:
        """Link ``payload`` to ``cache`` as it is now."""
        self._link = (weakref.ref(cache, self._released if self._release else None), cache_length(cache), payload)

    def _released(self, dead: weakref.ref) -> None:
        if self._link is not None and self._link[0] is dead:
            self._link = None

    def linked_length(self, cache) -> int | None:
        """The length ``cache`` had when linked, None if the link is to another cache."""
        link = self._link
        return link[1] if link is not None and link[0]() is cache else None

    def get(self, cache, cached: int) -> Any:
        """The payload if linked to ``cache`` holding ``cached`` tokens, else None."""
        return self._link[2] if self.linked_length(cache) == cached else None

    def reorder(self, cache, beam_idx, reorder_payload: Callable[[Any, Any], Any]) -> None:
        """Beam search reordered ``cache`` in place: reorder the payload with it if linked
        to it (``reorder_payload(payload, beam_idx)`` returns the reordered payload)."""
        if self.linked_length(cache) is not None:
            ref, length, payload = self._link
            self._link = (ref, length, reorder_payload(payload, beam_idx))

    def mismatch(self, cache, cached: int) -> str:
        """Why the link does not continue ``cache`` holding ``cached`` tokens: for the
        error messages of its users."""
        linked = self.linked_length(cache)
        if linked is None:
            return "this cache is not the one the model's last cached forward returned (another ran in between)"
        if cached < linked:
            return f"the cache holds {cached} tokens, {linked} when linked: it was cropped (assisted decoding does)"
        return (f"the cache holds {cached} tokens, {linked} when linked: it grew outside this model's adapted calls "
                "(a step with adapters disabled, or filled elsewhere)")
