"""Token-level knowledge distillation: the student matches the teacher's next-token distributions.

Hinton et al. (2015): soften both distributions with a temperature τ and minimise

    KL(p_teacher^τ || p_student^τ) · τ²        per response token,

where p^τ = softmax(logits / τ). The τ² keeps the gradient's size independent of τ (the soft
targets' gradients shrink as 1/τ²). Where a response token is a human label ("hard" label), the
usual cross-entropy is mixed in with weight α:

    loss = mean over response tokens t of  (1 - α) · τ² · KL_t  +  α · hard_t · CE_t

so on pseudo-labelled rows (the teacher's own summaries, ``hard_t = 0``) only the KL term counts.

``positions="all"`` (decoder-only) takes the KL over every real input position, the prompt's too,
while the cross-entropy stays on the response: the loss is then (1 - α) · τ² · mean KL over those
positions + α · (sum of hard CE) / (response tokens). A student cut from its teacher (every other layer
dropped) starts far from any language model; the prompt's few hundred positions per example carry ten
times the response's signal for repairing it, at the cost of running both heads on every position.

The batch is the supervised fine-tuning batch (``SupervisedFineTuning.collate``: prompt + response,
labels on the response) plus ``hard`` (B, T): True at label positions of rows whose response is a
human label. The teacher runs frozen, in eval mode and under ``no_grad`` inside the loss, and like
the student's its head runs on the labelled positions only: two (B, T, V) logit tensors at
V = 49,152 would be most of the memory of a step.

Shapes: B batch, T input length, C d_model, N labelled positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.objectives.base import IGNORE_INDEX
from lmlab.objectives.sft import SupervisedFineTuning


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · KL(softmax(teacher/τ) || softmax(student/τ)) per row: (N, V), (N, V) -> (N,), in fp32.

    A token the teacher rules out (logit −inf, e.g. a masked vocabulary) has p = 0 and adds nothing:
    its term is taken as 0 rather than computed as 0 · (−inf − log q), which is NaN.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    p_teacher = log_p_teacher.exp()  # (N, V)
    terms = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)  # (N, V)
    return terms.sum(dim=-1) * temperature**2  # (N,)


class TokenDistillation(SupervisedFineTuning):
    """Supervised fine-tuning's batches, with the teacher's soft targets on every response token."""

    name = "distill"

    def __init__(self, teacher: nn.Module, arch: str, pad_token_id: int, temperature: float = 2.0,
                 alpha: float = 0.5, decoder_start_token_id: int | None = None, positions: str = "response"):
        super().__init__(arch, pad_token_id, decoder_start_token_id)
        if positions not in ("response", "all"):
            raise ConfigError(f"distillation positions={positions!r} must be response or all")
        if positions == "all" and arch != "decoder":
            raise ConfigError(f"distillation positions=all needs a decoder-only model (arch={arch!r}: use response)")
        self.positions = positions
        if temperature <= 0:
            raise ConfigError(f"distillation temperature={temperature!r} must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation alpha={alpha!r} must be in [0, 1] (the weight of the hard-label loss)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def collate_hard(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], hard: Sequence[bool]) -> dict:
        """``collate(pairs)`` plus ``hard`` (B, T or S): label positions of rows whose response is a human label."""
        batch = self.collate(pairs)
        rows = torch.tensor([bool(h) for h in hard]).unsqueeze(1)  # (B, 1)
        batch["hard"] = (batch["labels"] != IGNORE_INDEX) & rows
        if self.positions == "all":  # every real input position; padding sits on the right of each row
            lengths = torch.tensor([len(p) + len(r) - 1 for p, r in pairs]).unsqueeze(1)  # (B, 1)
            batch["kl_mask"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0) < lengths  # (B, T)
        return batch

    def loss(self, model, batch):
        keep = batch["labels"] != IGNORE_INDEX  # (B, T): response positions
        scored = batch.get("kl_mask", keep)  # (B, T): the positions the KL covers (keep, or every real one)
        head = getattr(model, "module", model)
        student_logits = head.logits(self.hidden(model, batch)[scored]).float()  # (M, V)
        with torch.no_grad():
            teacher_logits = self.teacher.logits(self.hidden(self.teacher, batch)[scored]).float()  # (M, V)
        kl = distillation_kl(student_logits, teacher_logits, self.temperature)  # (M,)
        n_tokens = keep.sum()
        loss = (1.0 - self.alpha) * kl.sum() / scored.sum().clamp(min=1)
        hard = batch.get("hard")
        if self.alpha > 0 and hard is not None:
            in_response = keep[scored]  # (M,): which scored positions are response positions
            ce = F.cross_entropy(student_logits[in_response], batch["labels"][keep], reduction="none")  # (N,)
            loss = loss + self.alpha * (hard[keep].float() * ce).sum() / n_tokens.clamp(min=1)
        return loss, n_tokens
