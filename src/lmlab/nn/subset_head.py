"""An output head over a subset of the vocabulary ("vocabulary trimming" for a task model).

At batch 1 a small decoder's step is dominated by reading weights, and the output head is the largest
one: SmolLM2-135M's (49152 x 576) head is 28.3M of its 134.5M parameters, so a student that keeps half
the layers still reads the whole head every token. A summarizer that only ever writes a few thousand
distinct tokens can compute logits for those alone and leave the rest at -inf:

    logits (B, T, V) = -inf everywhere, except logits[..., ids] = h @ W[ids]^T

The rows kept are the original head's own rows (copied, so a tied embedding is untouched), so the
kept tokens' logits are exactly the full head's; only tokens outside `ids` can never be chosen. The
output keeps the full vocabulary's width, so every sampler, logits processor, beam search and the
tokenizer work unchanged. Shapes: B batch, T positions, C d_model, K kept tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.errors import ConfigError


def check_ids(ids, vocab_size: int) -> torch.Tensor:
    """`ids` as a sorted, distinct int64 tensor inside [0, vocab_size); one-line ConfigError otherwise."""
    ids = torch.as_tensor(ids)
    if ids.ndim != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ConfigError(f"output ids must be a non-empty list of token ids, got shape {tuple(ids.shape)} "
                          f"dtype {ids.dtype}")
    ids = ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ConfigError(f"output id {bad} is outside the vocabulary [0, {vocab_size})")
    unique = torch.unique(ids)  # sorted
    if unique.numel() != ids.numel():
        raise ConfigError(f"output ids repeat a token ({ids.numel() - unique.numel()} duplicates)")
    return unique


class SubsetHead(nn.Module):
    """``proj`` (C -> K) over the kept token ids; ``forward`` scatters its logits into a V-wide -inf row."""

    def __init__(self, proj: nn.Module, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        ids = check_ids(ids, vocab_size)
        if proj.out_features != ids.numel():
            raise ConfigError(f"the subset head's projection has {proj.out_features} outputs for {ids.numel()} ids")
        self.proj = proj
        self.register_buffer("ids", ids, persistent=True)
        self.vocab_size = vocab_size

    @property
    def in_features(self) -> int:
        return self.proj.in_features

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def expand(self, sub: torch.Tensor) -> torch.Tensor:
        """Logits over the kept ids (..., K) -> over the whole vocabulary (..., V), -inf outside the subset."""
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.expand(self.proj(hidden))  # (B, T, C) -> (B, T, K) -> (B, T, V)

    def extra_repr(self) -> str:
        return f"kept={self.ids.numel()} of vocab_size={self.vocab_size}"


def trim_output(model: nn.Module, ids) -> SubsetHead:
    """Replace `model`'s ``lm_head`` by a ``SubsetHead`` over `ids` (its rows copied) and return it.

    For inference: the kept tokens' logits are unchanged and every other token is -inf. A tied embedding
    stays whole (the input side still reads any token). Refused on a head that is already trimmed, a
    head with a bias or a quantized head (trim first, then quantize).
    """
    head = getattr(model, "lm_head", None)
    if isinstance(head, SubsetHead):
        raise ConfigError("this model's output head is already trimmed")
    if type(head) is not nn.Linear:
        raise ConfigError(f"trim_output needs a float nn.Linear head (trim before quantizing), got "
                          f"{type(head).__name__}")
    if head.bias is not None:
        raise ConfigError("trim_output does not support a head with a bias")
    ids = check_ids(ids, head.out_features)
    proj = nn.Linear(head.in_features, ids.numel(), bias=False, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        proj.weight.copy_(head.weight.index_select(0, ids.to(head.weight.device)))
    proj.weight.requires_grad_(head.weight.requires_grad)
    new = SubsetHead(proj, ids.to(head.weight.device), head.out_features)
    model.lm_head = new
    return new
