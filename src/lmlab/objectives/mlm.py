"""Masked language modelling (BERT): reconstruct a random 15% of the tokens from both sides' context.

Of the selected positions 80% become the mask token, 10% a random (non-special) token and 10% stay
unchanged, so the model cannot tell which visible tokens it will be asked about. Special tokens
(pad, bos, eos, cls, sep, mask...) are never selected. Labels are -100 except at selected positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lmlab.errors import ConfigError
from lmlab.objectives.base import IGNORE_INDEX, Objective, token_cross_entropy


class MaskedLM(Objective):
    name, arch = "mlm", "encoder"

    def __init__(self, mask_token_id: int, vocab_size: int, special_ids: Iterable[int] = (),
                 pad_token_id: int | None = None, mask_prob: float = 0.15,
                 replace_mask: float = 0.8, replace_random: float = 0.1):
        if mask_token_id is None or not 0 <= mask_token_id < vocab_size:
            raise ConfigError(f"mask_token_id={mask_token_id!r} must be a token id in [0, {vocab_size})")
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"mask_prob={mask_prob!r} must be in (0, 1)")
        if replace_mask < 0 or replace_random < 0 or replace_mask + replace_random > 1:
            raise ConfigError(f"replace_mask={replace_mask} + replace_random={replace_random} must be within [0, 1]")
        self.mask_token_id, self.vocab_size, self.pad_token_id = mask_token_id, vocab_size, pad_token_id
        self.mask_prob, self.replace_mask, self.replace_random = mask_prob, replace_mask, replace_random
        special = set(special_ids) | {mask_token_id} | ({pad_token_id} if pad_token_id is not None else set())
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[self.special_ids] = False
        self.random_pool = keep.nonzero().squeeze(1)  # ids a "random token" may become

    def prepare(self, blocks: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        def uniform() -> torch.Tensor:
            return torch.rand(blocks.shape, generator=generator)

        special = torch.isin(blocks, self.special_ids)  # (B, L)
        selected = (uniform() < self.mask_prob) & ~special
        # of the selected: u < 0.8 -> mask, 0.8 <= u < 0.9 -> random, else kept (one draw splits all three)
        u = uniform()
        to_mask = selected & (u < self.replace_mask)
        to_random = selected & (u >= self.replace_mask) & (u < self.replace_mask + self.replace_random)
        random_ids = self.random_pool[torch.randint(len(self.random_pool), blocks.shape, generator=generator)]

        input_ids = blocks.clone()
        input_ids[to_mask] = self.mask_token_id
        input_ids[to_random] = random_ids[to_random]
        labels = torch.full_like(blocks, IGNORE_INDEX)
        labels[selected] = blocks[selected]
        batch = {"input_ids": input_ids, "labels": labels}
        if self.pad_token_id is not None:
            mask = blocks != self.pad_token_id
            if not bool(mask.all()):
                batch["attention_mask"] = mask.long()
        return batch

    def loss(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, L, V)
        return token_cross_entropy(logits, batch["labels"])
