"""Transformer components. Each takes dimensions (or sub-modules); only builders read ModelConfig."""

from lmlab.nn.attention import Attention
from lmlab.nn.block import Block, Stack, additive_mask
from lmlab.nn.ffn import FeedForward, get_activation
from lmlab.nn.kv_cache import Cache, KVCache
from lmlab.nn.norm import RMSNorm, build_norm
from lmlab.nn.positional import RotaryEmbedding, T5RelativeBias, apply_rotary, sinusoidal_table

__all__ = [
    "Attention", "Block", "Stack", "additive_mask", "FeedForward", "get_activation", "Cache", "KVCache",
    "RMSNorm", "build_norm", "RotaryEmbedding", "T5RelativeBias", "apply_rotary", "sinusoidal_table",
]
