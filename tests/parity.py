"""Helpers shared by the per-family parity tests (test_parity_*.py)."""

from __future__ import annotations

import torch

import math

TOL = 1e-4  # max |logit difference| allowed against transformers in fp32 (tiny models; see fp32_bound)
EPS32 = torch.finfo(torch.float32).eps  # 2**-23 = 1.19e-7: fp32's relative rounding step


def fp32_bound(reference: torch.Tensor, config, seq_len: int = 0, headroom: float = 20.0,
               scale: float | None = None) -> float:
    """The largest |difference| two *correct* fp32 computations of `reference` may show.

    Two correct implementations (lmlab vs transformers, cached vs recomputed, 1 vs 2 threads, AVX2 vs
    AVX-512 kernels) differ only in the order their sums are rounded. A K-term dot product summed in
    another order moves by about eps * sqrt(K) of its magnitude (round-off errors are independent and
    zero-mean, so they add like a random walk); a model chains about 2 such reductions per layer (the
    attention and feed-forward branches, K up to max(d_model, d_ff, seq_len)) over L layers, and those
    errors add the same way: relative error ~ eps * sqrt(2 * L * K). The bound scales that by the
    logits' magnitude and by `headroom` = 20: ~4.5 for the largest of ~1e5 compared values (a 4.5-sigma
    tail) times ~4 for gains above 1 (norms, softmax, the "lively" test weights). A real bug (a wrong
    mask, position or norm) moves logits by 1e-2 of their scale or more, well above it.
    `scale` replaces max |reference| where the errors are relative to another magnitude (1 for a
    normalized vector: its entries are small, but they are rounded relative to the vector's norm).
    """
    layers = (config.n_layers or 0) + (getattr(config, "n_decoder_layers", 0) or 0)
    depth = max(config.d_model, config.d_ff or 0, seq_len)
    scale = float(reference.detach().abs().max()) if scale is None else scale
    return headroom * EPS32 * math.sqrt(2 * layers * depth) * scale


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
