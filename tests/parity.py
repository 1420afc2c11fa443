"""Helpers shared by the per-family parity tests (test_parity_*.py)."""

from __future__ import annotations

import torch

TOL = 1e-4  # max |logit difference| allowed against transformers in fp32


@torch.no_grad()
def perturb(model, std: float = 0.1):
    """HF initialises norms to 1 and biases to 0; perturb every 1-D parameter so a swapped or dropped one shows."""
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(torch.randn_like(p) * std)
    return model


def right_padded_batch(vocab: int, batch: int = 2, length: int = 12, pad_from: int = 8):
    """Random ids with the last row right-padded from `pad_from` (HF forward uses arange positions, as lmlab does)."""
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    mask[-1, pad_from:] = 0
    return ids, mask


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over the non-padded positions."""
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()
