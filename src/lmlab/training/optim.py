"""AdamW with decoupled weight decay on weight matrices only, and a warm-up + cosine learning rate.

Weight decay choice: decay applies to the 2-D weights of linear layers (attention, feed-forward,
MLM transform and an *untied* output head). It does not apply to biases and norm gains (1-D: decaying
them towards zero only hurts), nor to embedding tables (token, position, token-type, T5 relative
bias): a row of an embedding only gets a gradient when its token occurs, so decay would shrink rare
tokens' vectors every step regardless of data. A tied output head is the token embedding and is
therefore not decayed either.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: {decayed linear weight matrices} and {everything else}; tied parameters once."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (the fused kernel on CUDA)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             **({"fused": True} if on_cuda else {}))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine decay to ``min_ratio * lr`` at
    `total_steps`; held at the minimum afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio))
