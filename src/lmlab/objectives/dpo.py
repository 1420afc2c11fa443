"""Direct Preference Optimization (Rafailov et al., 2023): learn from pairs of (preferred, rejected) responses.

For a prompt x with a chosen response y_c and a rejected one y_r, DPO treats the policy's log-probability
ratio to a frozen reference as an implicit reward, r(x, y) = β (log π(y|x) − log π_ref(y|x)), and fits it
to the preference with the Bradley–Terry likelihood:

    loss = −log σ( β [ (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)) ] )

where log π(y|x) is the *sum* over the response's tokens (the end-of-sequence token included, so
stopping is part of what is preferred). β sets how far the policy may move from the reference: the
smaller it is, the larger the log-ratio needed to reach the same loss.

The reference is the frozen starting policy, and here it costs no second copy of the weights: the
policy is a LoRA-adapted model, and the reference is the same model with every adapter switched off
(``lmlab.adapt.lora.lora_disabled``), run in eval mode under ``no_grad``. (Starting from a fine-tuned
adapter, ``lmlab.training.align`` first folds that adapter into the base weights, so "adapters off" is
the fine-tuned model.)

A batch holds P pairs as 2P rows (the supervised fine-tuning collate: prompt + response, labels on the
response only): rows 0..P−1 are prompt + chosen, rows P..2P−1 prompt + rejected. Like fine-tuning, only
the labelled positions go through the output head. The loss is the mean over pairs, and the loop
weights micro-batches by pairs (``count``), not by tokens.

Shapes: P pairs, B = 2P rows, T input length, C d_model, N labelled positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.adapt.lora import lora_disabled
from lmlab.errors import ConfigError
from lmlab.objectives.base import IGNORE_INDEX, Objective
from lmlab.objectives.sft import SupervisedFineTuning


@dataclass
class PreferenceStats:
    """Per-pair DPO quantities, each (P,)."""

    loss: torch.Tensor  # −log σ(β (chosen_logratio − rejected_logratio))
    chosen_logratio: torch.Tensor  # log π(y_c|x) − log π_ref(y_c|x)
    rejected_logratio: torch.Tensor  # log π(y_r|x) − log π_ref(y_r|x)
    beta: float

    @property
    def chosen_reward(self) -> torch.Tensor:
        return self.beta * self.chosen_logratio

    @property
    def rejected_reward(self) -> torch.Tensor:
        return self.beta * self.rejected_logratio

    @property
    def reward_margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward

    @property
    def correct(self) -> torch.Tensor:
        """1 where the implicit reward ranks the pair as the data does (a tie counts as wrong)."""
        return (self.reward_margin > 0).float()

    def sums(self) -> dict[str, float]:
        """Sums over the pairs (divide by the pair count for means; sums add across micro-batches and ranks)."""
        values = {"dpo_loss": self.loss, "chosen_logratio": self.chosen_logratio,
                  "rejected_logratio": self.rejected_logratio, "reward_margin": self.reward_margin,
                  "reward_accuracy": self.correct}
        return {name: float(v.detach().float().sum()) for name, v in values.items()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> PreferenceStats:
    """The DPO loss per pair from sequence log-probabilities, each (P,) -> PreferenceStats.

    ``-logsigmoid`` rather than ``-log(sigmoid(.))``: it stays finite (and keeps its gradient) for the large
    negative margins a bad policy produces.
    """
    chosen = policy_chosen.float() - reference_chosen.float()  # (P,)
    rejected = policy_rejected.float() - reference_rejected.float()  # (P,)
    loss = -F.logsigmoid(beta * (chosen - rejected))  # (P,)
    return PreferenceStats(loss, chosen, rejected, beta)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum of log p(label) per row: logits (N, V) and labels (N,) at labelled positions, rows (N,) -> (n_rows,)."""
    token_logp = -F.cross_entropy(logits.float(), labels, reduction="none")  # (N,) = log_softmax gathered at labels
    return torch.zeros(n_rows, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)


class DirectPreference(Objective):
    """DPO over a LoRA policy whose reference is the same model with its adapters off (see the module doc).

    `reference` maps the (unwrapped) model to a context manager inside which the model *is* the
    reference; by default ``lora_disabled``. Training statistics (mean log-ratios, reward margin and
    accuracy) accumulate over the micro-batches of ``loss`` and are read, then reset, by ``train_metrics``.
    """

    name = "dpo"

    def __init__(self, arch: str, pad_token_id: int, beta: float, decoder_start_token_id: int | None = None,
                 reference: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None):
        if not beta > 0:
            raise ConfigError(f"dpo beta={beta!r} must be > 0 (typical values 0.05-0.5)")
        self.sft = SupervisedFineTuning(arch, pad_token_id, decoder_start_token_id)
        self.arch, self.beta = arch, float(beta)
        self.reference = reference or lora_disabled
        self._sums: dict[str, float] = {}
        self._pairs = 0

    # --- batches ---------------------------------------------------------------------------------
    def collate(self, triples: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        """[(prompt ids, chosen ids, rejected ids), ...] -> 2P rows: P prompt+chosen, then P prompt+rejected."""
        rows = [(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples]
        return self.sft.collate(rows)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over pairs, so the loop weights this micro-batch by its pair count.

        A pair whose labels are all ignored (a filler a rank runs when its share of a batch is empty, to
        take part in the gradient all-reduce) counts for nothing."""
        return int(self._real_pairs(batch).sum())

    @staticmethod
    def _real_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P,) True for pairs with labelled responses in both rows."""
        labelled = (batch["labels"] != IGNORE_INDEX).any(dim=1)  # (2P,)
        P = labelled.shape[0] // 2
        return labelled[:P] & labelled[P:]

    # --- log-probabilities --------------------------------------------------------------------------
    def logprobs(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed response log-probability of every row (B,) under `model` (the head on labelled positions only)."""
        keep = batch["labels"] != IGNORE_INDEX  # (B, T)
        hidden = self.sft.hidden(model, batch)  # (B, T, C)
        head = getattr(model, "module", model)
        logits = head.logits(hidden[keep])  # (N, V)
        rows = keep.nonzero()[:, 0]  # (N,) the row of each labelled position (row-major, as hidden[keep])
        return sequence_logprobs(logits, batch["labels"][keep], rows, keep.shape[0])

    def reference_logprobs(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen reference's (B,) log-probabilities: adapters off, eval mode (no dropout), no graph."""
        module = getattr(model, "module", model)  # not through DDP: nothing here takes part in backward
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), self.reference(module):
                return self.logprobs(module, batch)
        finally:
            module.train(was_training)

    def stats(self, model, batch: dict[str, torch.Tensor]) -> PreferenceStats:
        policy = self.logprobs(model, batch)  # (2P,)
        reference = self.reference_logprobs(model, batch)  # (2P,)
        P = policy.shape[0] // 2
        return dpo_loss(policy[:P], policy[P:], reference[:P], reference[P:], self.beta)

    # --- the loss the loop calls ------------------------------------------------------------------
    def loss(self, model, batch):
        stats = self.stats(model, batch)
        real = self._real_pairs(batch).to(stats.loss.device)  # (P,)
        if not bool(real.all()):  # filler pairs enter neither the loss nor the training metrics
            stats = PreferenceStats(stats.loss[real], stats.chosen_logratio[real], stats.rejected_logratio[real],
                                    stats.beta)
        for name, value in stats.sums().items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        n = stats.loss.shape[0]
        self._pairs += n
        # sum / max(n, 1): a mean over the real pairs, an exact 0 that still carries a graph when there are none
        return stats.loss.sum() / max(n, 1), torch.tensor(n)

    def train_metrics(self) -> dict[str, float]:
        """Means over the pairs seen by ``loss`` since the last call (this rank's), then reset."""
        means = {name: value / self._pairs for name, value in self._sums.items()} if self._pairs else {}
        self._sums, self._pairs = {}, 0
        return means

    def prepare(self, blocks, generator=None):  # pairs are collated by the data source, not from token blocks
        raise NotImplementedError("DirectPreference batches come from collate(triples)")
