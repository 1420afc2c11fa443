"""Reward modelling: a scalar score per (prompt, response), fitted to preferences with the Bradley–Terry loss.

Bradley–Terry says a person prefers response a over b with probability σ(r(a) − r(b)). For a pair
(chosen y_c, rejected y_r) the negative log-likelihood is

    loss = −log σ( r(x, y_c) − r(x, y_r) )            (mean over pairs)

Only score *differences* enter the loss, so the scores have no fixed zero: a reward model says which
of two summaries is better and by how much, not whether one is good in absolute terms.

A batch holds P pairs as 2P rows, right-padded: rows 0..P−1 are prompt + chosen, rows P..2P−1 are
prompt + rejected (the same layout as DPO's). The model is a ``lmlab.align.reward.RewardModel``: it
maps (input_ids, attention_mask) to one score per row. The loop weights micro-batches by pairs (``count``).

Shapes: P pairs, B = 2P rows, T input length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmlab.objectives.base import Objective


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(chosen − rejected) over pairs; ``logsigmoid`` keeps large margins finite."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded (B, T) ids and the (B, T) attention mask (1 on real tokens)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def response_mask(rows: Sequence[Sequence[int]], response_lengths: Sequence[int]) -> torch.Tensor:
    """(B, T) mask, 1 on each row's last `response_lengths[b]` real tokens (the response and its end token),
    for ``response_mean`` pooling; T is the longest row, as in ``pad_rows``."""
    T = max(len(r) for r in rows)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, (row, n) in enumerate(zip(rows, response_lengths)):
        mask[b, len(row) - n: len(row)] = 1
    return mask


class PairwiseReward(Objective):
    """The Bradley–Terry objective over (chosen, rejected) rows of one prompt each."""

    name = "reward"

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self._last: dict[str, float] = {}

    def collate(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                response_lengths: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """[(chosen row ids, rejected row ids), ...] (each prompt + response) -> the 2P-row batch; with
        `response_lengths` [(chosen's, rejected's), ...] also ``pool_mask`` (2P, T), 1 on the responses."""
        rows = [list(c) for c, _ in pairs] + [list(r) for _, r in pairs]
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id)  # (2P, T) each
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if response_lengths is not None:
            lengths = [c for c, _ in response_lengths] + [r for _, r in response_lengths]
            batch["pool_mask"] = response_mask(rows, lengths)  # (2P, T)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over pairs, so micro-batches are weighted by their pair count."""
        return batch["input_ids"].shape[0] // 2

    def scores(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores (P,), rejected scores (P,))."""
        scores = model(batch["input_ids"], batch["attention_mask"], batch.get("pool_mask"))  # (2P,)
        P = scores.shape[0] // 2
        return scores[:P], scores[P:]

    def loss(self, model, batch):
        chosen, rejected = self.scores(model, batch)
        loss = bradley_terry_loss(chosen, rejected)
        with torch.no_grad():
            margin = (chosen - rejected).float()
            self._last = {"reward_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean())}
        return loss, torch.tensor(chosen.shape[0], device=loss.device)

    def train_metrics(self) -> dict[str, float]:
        """The last micro-batch's pairwise accuracy and mean margin (logged beside the loss)."""
        return dict(self._last)
