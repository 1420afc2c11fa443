"""Preallocated key/value caches for incremental decoding.

`KVCache` holds one layer's self-attention keys and values in buffers sized for the whole generation,
so each decoding step writes one slot instead of concatenating tensors. `Cache` groups the layers of a
decoder stack, the cross-attention keys/values of an encoder-decoder (computed once from the encoder
output), and the number of positions already written.

Shapes: B batch, Hkv key/value heads, L capacity, D head dim.
"""

from __future__ import annotations

import torch

from lmlab.errors import DataError


class KVCache:
    def __init__(self, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device=None):
        self.k = torch.zeros(batch, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)  # (B, Hkv, L, D)
        self.v = torch.zeros_like(self.k)
        self.capacity = capacity

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at positions start..start+T-1; return all keys/values written so far."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise DataError(f"KV cache overflow: need {end} positions, capacity is {self.capacity}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class Cache:
    """Everything a decoder stack remembers between decoding steps."""

    def __init__(self, layers: list[KVCache]):
        self.layers = layers
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self.length = 0  # positions already written

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search, dropping finished rows)."""
        for layer in self.layers:
            layer.reorder(index)
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index)) for kv in self.cross]
