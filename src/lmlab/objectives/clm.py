"""Causal language modelling: predict token t+1 from tokens <= t (decoder-only models).

A block of L = T + 1 tokens gives T inputs and T shifted targets, so no position is wasted on a
target that does not exist. Padding (when a pad id is given) is masked out of attention and loss.
"""

from __future__ import annotations

import torch

from lmlab.objectives.base import IGNORE_INDEX, Objective, token_cross_entropy


class CausalLM(Objective):
    name, arch = "clm", "decoder"

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id

    def block_length(self, seq_len: int) -> int:
        return seq_len + 1  # T inputs + the one extra target

    def prepare(self, blocks: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        input_ids = blocks[:, :-1].contiguous()  # (B, T)
        labels = blocks[:, 1:].clone()  # (B, T): labels[:, t] is the token after input_ids[:, t]
        batch = {"input_ids": input_ids, "labels": labels}
        if self.pad_token_id is not None:
            labels[labels == self.pad_token_id] = IGNORE_INDEX
            mask = input_ids != self.pad_token_id
            if not bool(mask.all()):
                batch["attention_mask"] = mask.long()
        return batch

    def loss(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
        return token_cross_entropy(logits, batch["labels"])
