"""The KV cache: one K and one V tensor per layer, grown in blocks, written in place.

Layout per layer: (B, H_kv, capacity, D). Capacity grows by `block_size` tokens at a time, so a
short chat does not reserve the whole context window, and never exceeds `max_tokens`. Separate
tensors per layer (not one stacked tensor) keep each decode step's writes and reads contiguous.
`length` is the number of valid positions; `trim(n)` forgets the tail (used for prefix reuse and
for rolling back speculative or rejected tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ContextLengthError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = 256,  # 256 tokens: few regrowths for a chat turn, little waste
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_tokens, self.batch_size, self.block_size = max_tokens, batch_size, block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.capacity = 0
        self.token_ids: list[int] = []  # what the cached positions hold, for prefix reuse (kept by the engine)
        self.owner: object | None = None  # the engine Sequence whose tokens the cache holds now
        self.decode_graph = None  # engine.graphs.DecodeGraph recorded over this cache's tensors (CUDA)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._grow_to(min(block_size, max_tokens))

    def _grow_to(self, capacity: int) -> None:
        shape = (self.batch_size, self.num_kv_heads, capacity, self.head_dim)
        # One tensor at a time, the old one dropped before the next is made: growing holds the cache
        # plus one layer's copy, not two caches (at 32K tokens of zen-eco-4b: +0.13 GB, not +4.8 GB).
        for store in (self.keys, self.values):
            for i in range(self.num_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    new[:, :, : self.length].copy_(store[i][:, :, : self.length])
                    store[i] = new
                else:
                    store.append(new)
        self.capacity = capacity

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions (call once per forward, before the layers write)."""
        needed = self.length + new_tokens
        if needed > self.max_tokens:
            raise ContextLengthError(
                f"KV cache holds at most {self.max_tokens} tokens; {self.length} are used and "
                f"{new_tokens} more were asked for"
            )
        if needed > self.capacity:
            blocks = -(-needed // self.block_size)
            self._grow_to(min(blocks * self.block_size, self.max_tokens))

    def positions(self, new_tokens: int) -> torch.Tensor:
        """The positions of the next `new_tokens` tokens, (T,) int64 on the cache's device."""
        return torch.arange(self.length, self.length + new_tokens, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at positions [length, length+T); return views of the valid K, V from
        position `first` on (a sliding layer's prefill needs only its window)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, first:end], self.values[layer][:, :, first:end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None) -> torch.Tensor:
        """One decode step of attention: store k, v (1, H_kv, 1, D) and attend q (1, H, 1, D) to every
        cached position (the last `window` ones for a sliding layer). Returns (1, H, D).

        The query heads that share a KV head are folded into the query-length axis, so attention is
        two plain matmuls and K/V are never repeated. A quantized cache overrides this method."""
        keys, values = self.update(layer, k, v)
        if window is not None and keys.shape[2] > window:
            keys, values = keys[:, :, -window:], values[:, :, -window:]
        if keys.dtype != q.dtype:  # bf16 rows under a float32 model: attention in float32
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        h_kv, d = keys.shape[1], keys.shape[3]
        out = F.scaled_dot_product_attention(q.view(1, h_kv, -1, d), keys, values, scale=scale)
        return out.reshape(1, -1, d)

    def advance(self, n: int) -> None:
        """Mark n more positions valid (after every layer wrote them)."""
        self.length += n

    def trim(self, length: int) -> None:
        """Keep only the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of {self.length} tokens to {length}")
        self.length = length
        del self.token_ids[length:]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
