"""Normalisation layers: LayerNorm (with or without bias) and RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import choices_error


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LLaMA, T5). No mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """Resolve the config's `norm` string to a module."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise choices_error("norm", kind, ("layernorm", "rmsnorm"))
