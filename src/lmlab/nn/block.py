"""A Transformer block and the stack of blocks that serves as both encoder and decoder.

Shapes: B batch, T query length, S key length (past + T), H heads, C d_model.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import DataError
from lmlab.nn.attention import Attention
from lmlab.nn.ffn import FeedForward
from lmlab.nn.kv_cache import Cache, KVCache
from lmlab.nn.norm import build_norm
from lmlab.nn.positional import RotaryEmbedding, T5RelativeBias


def _attention(cfg: ModelConfig, cross: bool) -> Attention:
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=cfg.attn_bias,
                     out_bias=cfg.attn_out_bias, scale=cfg.attn_scale, dropout=cfg.attn_dropout, cross=cross)


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual branch.

    pre-norm:  x = x + f(norm(x))      (GPT-2, LLaMA, T5)
    post-norm: x = norm(x + f(x))      (BERT, the original Transformer)
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        norm = lambda: build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)  # noqa: E731
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm, self.attn = norm(), _attention(cfg, cross=False)
        self.cross_norm, self.cross_attn = (norm(), _attention(cfg, cross=True)) if cross else (None, None)
        self.ffn_norm = norm()
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated_ffn, cfg.ffn_bias, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x, mask=None, is_causal=False, rope=None, context=None, context_mask=None,
                cache: KVCache | None = None, cache_start: int = 0, cross_kv=None):
        x = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, mask=mask, is_causal=is_causal, rope=rope, cache=cache, cache_start=cache_start)[0])
        if self.cross_attn is not None:
            def cross(h):
                nonlocal cross_kv
                out, cross_kv = self.cross_attn(h, mask=context_mask, context=context, cross_kv=cross_kv)
                return out
            x = self._residual(x, self.cross_norm, cross)
        x = self._residual(x, self.ffn_norm, self.ffn)
        return x, cross_kv


def has_padding(mask: torch.Tensor | None, known: bool | None = None) -> bool:
    """Whether a (B, S) 1/0 mask blocks anything: `known` when the caller says so, else looked up.

    Looking it up reads a value back to the host (on an accelerator: a sync that stalls the queue),
    so a caller that already knows -- generation decides it once per run -- passes `known`.
    """
    if mask is None:
        return False
    return known if known is not None else not bool(mask.all())


def additive_mask(attention_mask: torch.Tensor | None, T: int, S: int, past: int, causal: bool,
                  dtype: torch.dtype, device, explicit: bool = False,
                  mask_has_padding: bool | None = None) -> tuple[torch.Tensor | None, bool]:
    """Combine key padding and causality into one additive mask (0 = attend, dtype-min = blocked).

    Returns (mask, is_causal). Unless `explicit`, the common unpadded cases return no mask at all so that
    SDPA can use its fused causal kernel. Blocked scores use the dtype's minimum rather than -inf so
    a fully padded query row stays finite (its output is ignored anyway). `mask_has_padding`: see
    ``has_padding``.
    """
    padded = has_padding(attention_mask, mask_has_padding)
    if not padded:
        if not causal or T == 1:  # nothing to block: a single new query may see every cached key
            return None, False
        if past == 0 and not explicit:
            return None, True
    allowed = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        allowed = torch.arange(S, device=device)[None, :] <= q_pos  # (T, S)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if padded:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min), False


class Stack(nn.Module):
    """N blocks with their shared positional machinery; an encoder or (causal=True) a decoder.

    Cross-attention is a flag: ``cross=True`` gives each block a cross-attention branch over `context`.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool = False):
        super().__init__()
        self.causal, self.cross = causal, cross
        self.layers = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_layers))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.positional == "rope" else None
        self.rel_bias = (T5RelativeBias(cfg.n_heads, cfg.rel_num_buckets, cfg.rel_max_distance, bidirectional=not causal)
                         if cfg.positional == "t5_relative" else None)
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.final_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C) embedded inputs
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, 0 = padding; covers past + T
        position_ids: torch.Tensor | None = None,  # (B, T) rotary positions; default past..past+T-1
        context: torch.Tensor | None = None,  # (B, S_enc, C) encoder output for cross-attention
        context_mask: torch.Tensor | None = None,  # (B, S_enc)
        cache: Cache | None = None,
        mask_has_padding: bool | None = None,  # whether the masks above hold padding; None: look (a host sync)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is not None and attention_mask.shape[-1] != S:
            raise DataError(f"attention_mask covers {attention_mask.shape[-1]} positions; expected {S} (past {past} + new {T})")
        rope = None
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(past, S, device=x.device)[None].expand(B, T)
            rope = self.rotary(position_ids)
        # T5 adds its relative bias to the scores, so it needs the causal mask spelled out
        explicit = self.rel_bias is not None
        mask, is_causal = additive_mask(attention_mask, T, S, past, self.causal, x.dtype, x.device, explicit,
                                        mask_has_padding)
        if self.rel_bias is not None:  # one learned bias per stack, shared by all its layers
            bias = self.rel_bias(T, S, q_offset=past).to(x.dtype)  # (1, H, T, S)
            mask = bias if mask is None else mask + bias
        cross_mask = None
        if self.cross and has_padding(context_mask, mask_has_padding):
            cross_mask = torch.zeros(context_mask.shape, dtype=x.dtype, device=x.device)
            cross_mask = cross_mask.masked_fill_(~context_mask.bool(), torch.finfo(x.dtype).min)[:, None, None, :]  # (B,1,1,S_enc)
        for i, layer in enumerate(self.layers):
            x, cross_kv = layer(
                x, mask=mask, is_causal=is_causal, rope=rope, context=context, context_mask=cross_mask,
                cache=cache.layers[i] if cache is not None else None, cache_start=past,
                cross_kv=cache.cross[i] if cache is not None else None,
            )
            if cache is not None and self.cross:
                cache.cross[i] = cross_kv
        if cache is not None:
            cache.length = S
        return self.final_norm(x) if self.final_norm is not None else x
