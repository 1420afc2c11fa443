"""The objective interface, the registry's names (``lmlab.objectives.build_objective`` resolves them), and
the token cross-entropy every objective shares.

Shapes: B batch, L raw block length, T model input length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value the loss skips (padding, unselected MLM positions)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over positions whose label is not IGNORE_INDEX -> (loss, n_tokens).

    `n_tokens` is a 0-d int64 tensor on the logits' device (``int(n)`` when a number is needed):
    keeping it a tensor avoids a host-device synchronisation per micro-batch on accelerators. Logits
    are upcast to fp32 (under bf16 autocast the softmax over V needs the range). With no counted
    position the loss is an exact 0 that still carries a graph, so backward() is harmless.
    """
    V = logits.shape[-1]
    n_tokens = (labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / n_tokens.clamp(min=1), n_tokens


class Objective:
    """A batch transform plus a loss. Subclasses set ``name`` and ``arch`` (the model arch they train)."""

    name: str = ""
    arch: str = ""

    def block_length(self, seq_len: int) -> int:
        """Raw tokens per block so that the model input is at most `seq_len` long."""
        return seq_len

    def prepare(self, blocks: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the counted positions, number of counted positions as a 0-d tensor)."""
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What ``loss`` is a mean over, counted (the loop weights micro-batches by it): labelled positions here,
        pairs for preference objectives."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def train_metrics(self) -> dict[str, float]:
        """Extra training metrics gathered by ``loss`` since the last call, logged beside the loss (none here)."""
        return {}


# registry name -> class name (the classes live in their own modules; lmlab.objectives.build_objective builds them)
OBJECTIVES = {"clm": "CausalLM", "mlm": "MaskedLM", "span": "SpanCorruption"}
ARCH_OBJECTIVE = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}
