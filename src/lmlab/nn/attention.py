"""Multi-head attention: self, causal self, cross and grouped-query, on scaled_dot_product_attention.

Shapes: B batch, T query length, S key length, H query heads, Hkv key/value heads, D head dim, C d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.kv_cache import KVCache
from lmlab.nn.positional import apply_rotary


class Attention(nn.Module):
    """softmax(q k^T * scale + mask) v over H heads, with Hkv <= H key/value heads (GQA when fewer).

    Self-attention projects keys and values from `x`; cross-attention (``cross=True``) from `context`,
    the encoder output, and can reuse them from the cache after the first decoding step.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False,
                 out_bias: bool = False, scale: float | None = None, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.dropout, self.cross = scale, dropout, cross
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        mask: torch.Tensor | None = None,  # additive (B or 1, 1 or H, T, S), or None
        is_causal: bool = False,  # use SDPA's causal mask (only when mask is None and T == S)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin (B, 1, T, D)
        context: torch.Tensor | None = None,  # (B, S, C) for cross-attention
        cache: KVCache | None = None,
        cache_start: int = 0,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        B, T, _ = x.shape
        q = self._heads(self.q(x), self.n_heads)  # (B, H, T, D)
        if self.cross:
            if cross_kv is None:
                cross_kv = (self._heads(self.k(context), self.n_kv_heads), self._heads(self.v(context), self.n_kv_heads))
            k, v = cross_kv  # (B, Hkv, S, D)
        else:
            k = self._heads(self.k(x), self.n_kv_heads)  # (B, Hkv, T, D)
            v = self._heads(self.v(x), self.n_kv_heads)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                k, v = cache.update(k, v, cache_start)  # (B, Hkv, S, D), S = cache_start + T
        # grouped-query: each kv head serves H/Hkv query heads; SDPA broadcasts them itself (enable_gqa)
        # instead of us copying k and v H/Hkv times per layer and step
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None, scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o(y), (cross_kv if self.cross else None)
