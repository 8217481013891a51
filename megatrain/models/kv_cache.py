"""Key/value cache for incremental decoding: one preallocated (B, Hkv, S_max, D) buffer pair per layer.

``Transformer.forward(ids, cache=cache)`` appends the new tokens' keys and values to every layer and
attends over everything cached so far; ``cache.length`` then advances by T. ``segments`` rides along per
key, so a left-padded batch (pad = segment 0, prompt and continuation = segment 1) never attends to its
padding. Under tensor parallelism each rank caches only its own kv heads: Hkv is whatever the local
projection produced.
"""
from __future__ import annotations

import torch


class LayerCache:
    """One layer's keys and values, filled lazily on the first call (shapes come from the projections)."""

    def __init__(self, owner: "KVCache"):
        self.owner = owner
        self.k: torch.Tensor | None = None  # (B, Hkv, S_max, D)
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hkv, T, D) for the new tokens -> all cached keys and values (B, Hkv, length + T, D)."""
        start, t = self.owner.length, k.shape[2]
        if start + t > self.owner.max_len:
            raise ValueError(f"KV cache holds {self.owner.max_len} positions; {start} + {t} overflows it "
                             "(raise max_len when building the cache)")
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_zeros(b, h, self.owner.max_len, d)
            self.v = v.new_zeros(b, h, self.owner.max_len, d)
        self.k[:, :, start:start + t] = k
        self.v[:, :, start:start + t] = v
        return self.k[:, :, :start + t], self.v[:, :, :start + t]


class KVCache:
    """Caches for ``num_layers`` layers of up to ``max_len`` positions; ``length`` tokens are cached."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(num_layers)]
        self.segments: torch.Tensor | None = None  # (B, length) segment id of every cached key, when given
        self.step_key_segments: torch.Tensor | None = None  # (B, length + T) during a forward of T new tokens

    def positions_for(self, batch: int, t: int, device) -> torch.Tensor:
        """Default positions of T new tokens: they follow the cached ones. (B, T)."""
        return torch.arange(self.length, self.length + t, device=device).expand(batch, t)

    def key_segments(self, segments: torch.Tensor | None) -> torch.Tensor | None:
        """The segment ids of all keys once ``segments`` (B, T) of the new tokens are added. (B, length + T)."""
        if segments is None and self.segments is None:
            return None
        if self.length == 0:
            return segments
        if segments is None or self.segments is None:
            raise ValueError("pass segments on every call of a cached forward, or on none")
        return torch.cat([self.segments, segments], dim=1)

    def begin(self, segments: torch.Tensor | None) -> None:
        """Called by the model before its layers run on T new tokens with ``segments`` (B, T): every layer then
        reads the same key segments."""
        self.step_key_segments = self.key_segments(segments)

    def advance(self, t: int) -> None:
        """Called by the model once every layer has appended T tokens."""
        self.length += t
        self.segments, self.step_key_segments = self.step_key_segments, None
