"""Pre-training objectives: each turns packed token blocks into model inputs and computes a loss.

Every objective has the same two-method interface (see ``base.Objective``) so the training loop never
knows which one it runs:

* ``prepare(blocks, generator) -> dict``   blocks (B, L) int64 token ids -> tensors the model and loss need
* ``loss(model, batch) -> (loss, n_tokens)`` mean cross-entropy over the n_tokens positions that count
  (n_tokens a 0-d tensor, so no device sync is forced)

Registry by name: ``clm`` (decoder), ``mlm`` (encoder), ``span`` (encoder-decoder). Fine-tuning's
``SupervisedFineTuning`` (``sft.py``) collates tokenized (prompt, response) pairs instead of blocks.
"""

from typing import Any

from lmlab.errors import choices_error
from lmlab.objectives.base import OBJECTIVES, Objective, token_cross_entropy
from lmlab.objectives.clm import CausalLM
from lmlab.objectives.mlm import MaskedLM
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.objectives.span_corruption import SpanCorruption, random_spans_noise_mask

_CLASSES = {cls.__name__: cls for cls in (CausalLM, MaskedLM, SpanCorruption)}


def build_objective(name: str, **kwargs: Any) -> Objective:
    """Resolve an objective by registry name (clm | mlm | span) and construct it with `kwargs`."""
    if name not in OBJECTIVES:
        raise choices_error("objective", name, sorted(OBJECTIVES))
    return _CLASSES[OBJECTIVES[name]](**kwargs)


__all__ = ["OBJECTIVES", "Objective", "build_objective", "token_cross_entropy", "CausalLM", "MaskedLM",
           "SpanCorruption", "SupervisedFineTuning", "random_spans_noise_mask"]
