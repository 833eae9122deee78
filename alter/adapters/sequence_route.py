"""The sequence route (``AlterConfig.routing = "sequence"``): a position goes to a forget
expert once one of the forget set's keys (short token sequences that occur in no
retained row) has occurred at or before it, and to the retention expert before that.

Why not the per-token routers: docs/routing.md measures that they cannot isolate the
forget set on the suite's models (the layer-0 q/k/v routers see no context; the best
linear separator of a position's hidden state reaches 0.26-0.82 of the forget positions at
5% retained leak), while a decision taken once, where the row leaves every retained row,
and carried to every later position, separates them by construction. The decision is
causal, so decoding carries it from token to token (:class:`RouteCarry`).

The keys are found from the rows ``unlearn`` is given (``alter.methods.data.route_keys``)
and saved in the adapter's config.
"""
from __future__ import annotations

import dataclasses

import torch

from alter.adapters.cache_link import CacheLink, cache_length
from alter.adapters.hooks import input_cache
from alter.config import MAX_KEY_TOKENS


@dataclasses.dataclass(frozen=True)
class RouteCarry:
    """What a decoded token's route needs from the tokens before it: per sample, the
    forget expert already chosen (0: none yet) [B] int64 and the last
    ``MAX_KEY_TOKENS - 1`` tokens [B, <= MAX_KEY_TOKENS - 1] int64 (a key may span calls)."""

    experts: torch.Tensor
    tail: torch.Tensor


# Two polynomial hashes modulo primes below 2^31, so that every product fits an int64;
# together a 62-bit code. A code only finds a key's candidate: the key table compares its
# tokens too, so the route is exact whatever collides.
_HASHES = ((2147483647, 1000003), (2147483629, 998244353))


def _codes(windows: torch.Tensor) -> torch.Tensor:
    """int64 codes [...] of token windows [..., n] int64 (ids in [0, 2^31), any
    vocabulary): two polynomial hashes of the window side by side. Equal windows have
    equal codes. Few ops: the route runs in every forward, decode steps included."""
    code = None
    for prime, base in _HASHES:
        part = windows[..., 0]  # an id below 2^31 is its own first step
        for j in range(1, windows.shape[-1]):
            part = torch.add(windows[..., j], part, alpha=base).remainder_(prime)
        code = part if code is None else code * (1 << 31) + part
    return code


class KeyTable:
    """The keys of a config grouped by length, as sorted codes with their tokens and
    experts, on one device (built once per device and kept by the tracker)."""

    def __init__(self, keys: list[dict], device: torch.device):
        self.by_length = {}
        for n in range(1, MAX_KEY_TOKENS + 1):
            group = [k for k in keys if len(k["tokens"]) == n]
            if not group:
                continue
            tokens = torch.tensor([k["tokens"] for k in group], dtype=torch.int64)
            experts = torch.tensor([k["expert"] for k in group], dtype=torch.int64)
            codes, order = _codes(tokens).sort()
            if bool((codes[1:] == codes[:-1]).any()):
                raise ValueError(f"route_keys: two keys of {n} tokens share a hash code; the key table cannot hold "
                                 "both (drop one of them)")
            self.by_length[n] = (codes.to(device), tokens[order].to(device), experts[order].to(device))

    def route(self, input_ids: torch.Tensor, carry: RouteCarry | None) -> tuple[torch.Tensor, RouteCarry]:
        """(route [B, L] int64, the carry after these tokens) of ``input_ids`` [B, L]
        following ``carry`` (None: the sequences start here). A position's expert is that
        of the first key that ends at or before it (ties: the longer key), carried from an
        earlier call when one fired there; 0 (retention) before any key. No host sync."""
        batch, length = input_ids.shape
        device = input_ids.device
        ids = input_ids.long()
        tail = torch.zeros(batch, 0, dtype=torch.int64, device=device) if carry is None else carry.tail.to(device)
        context = torch.cat([tail, ids], dim=1)
        offset = tail.shape[1]
        fired = torch.zeros(batch, length, dtype=torch.int64, device=device)  # the key's expert ending at t, 0: none
        for n, (codes, tokens, experts) in sorted(self.by_length.items()):
            if context.shape[1] < n:
                continue
            # windows ending at each new position (those starting before the tail's first token are cut)
            windows = context.unfold(1, n, 1)[:, max(offset - n + 1, 0):]
            codes_here = _codes(windows).contiguous()
            start = length - codes_here.shape[1]
            index = torch.searchsorted(codes, codes_here).clamp_max(codes.numel() - 1)
            hit = (codes[index] == codes_here) & (tokens[index] == windows).all(-1)
            fired[:, start:] = torch.where(hit, experts[index], fired[:, start:])
        any_fired = fired > 0
        first = any_fired.int().argmax(dim=1, keepdim=True)
        expert = torch.where(any_fired.any(dim=1, keepdim=True), fired.gather(1, first), 0)
        positions = torch.arange(length, device=device)[None, :]
        route = torch.where(positions >= first, expert, 0)
        if carry is not None:
            carried = carry.experts.to(device)[:, None]
            route = torch.where(carried > 0, carried, route)
        new_tail = context[:, -(MAX_KEY_TOKENS - 1):]
        return route, RouteCarry(experts=route[:, -1], tail=new_tail)


class SequenceRouting:
    """The sequence route of a patched model's calls (its tracker owns one): the key table
    of ``config.route_keys`` on the input's device, and each KV cache's carry, linked to
    the cache its forward returned (as the prepass links the base model's cache)."""

    def __init__(self, config):
        self.config = config
        self._table: tuple | None = None  # (the keys list it was built from, device, KeyTable)
        self._carry = CacheLink()  # the RouteCarry of a KV cache's tokens
        self._pending: RouteCarry | None = None  # the running forward's carry

    def call_route(self, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
        """The route [B, L] int32 of a call's token ids, carried from its KV cache's tokens
        (int32: what the layers read, cast once per call rather than once per layer)."""
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise RuntimeError("routing='sequence' routes by token ids: call the model with input_ids, "
                               "not inputs_embeds")
        keys = self.config.route_keys
        if self._table is None or self._table[0] is not keys or self._table[1] != tokens.device:
            self._table = (keys, tokens.device, KeyTable(keys, tokens.device))
        _, cache = input_cache(inputs)
        carry = None
        cached = 0 if cache is None else cache_length(cache)
        if cached:
            carry = self._carry.get(cache, cached)
            if carry is None:  # a crop cannot be undone either: the carry holds the last tokens only
                raise RuntimeError(
                    "routing='sequence' carries each sequence's route in the KV cache's tokens, filled when they "
                    "ran through this patched model (as generate() does): "
                    f"{self._carry.mismatch(cache, cached)}; decode without an assistant model")
        route, self._pending = self._table[2].route(tokens, carry)
        return route.int()

    def call_ended(self, returned_cache) -> None:
        """Link the finished call's carry to the KV cache it returned (None: it kept none)."""
        carry, self._pending = self._pending, None
        if returned_cache is not None and carry is not None:
            self._carry.set(returned_cache, carry)

    def reorder(self, cache, beam_idx: torch.Tensor) -> None:
        """Reorder the routes carried in ``cache`` as beam search reorders it."""
        self._carry.reorder(cache, beam_idx, lambda carry, idx: RouteCarry(
            experts=carry.experts[idx.to(carry.experts.device)], tail=carry.tail[idx.to(carry.tail.device)]))
