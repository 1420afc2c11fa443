"""Models to inspect: any ``lmlab.load_model`` source, or ``random:PRESET`` -- a ``ModelConfig`` preset with
random weights (T5: no T5 weights are available offline, so ``random:t5-small`` is the real t5-small shape)."""

from __future__ import annotations

import torch

from lmlab.errors import DataError

RANDOM = "random:"
DEFAULT_TOKENIZER = "all-minilm-l6-v2"  # a WordPiece vocabulary of 30522 pieces: fits t5-small's 32128 rows


def load_for_inspection(source: str, tokenizer: str | None = None, seed: int = 0, dtype: str | None = None):
    """(model, tokenizer, name) for `source`; ``tokenizer`` overrides the source's own (random presets need one)."""
    import lmlab
    from lmlab.config import PRESETS, ModelConfig
    from lmlab.model import Transformer

    if source.startswith(RANDOM):
        preset = source[len(RANDOM):]
        if preset not in PRESETS:
            raise DataError(f"model {source!r}: unknown preset {preset!r}; choose one of: "
                            + ", ".join(RANDOM + p for p in PRESETS))
        tok = lmlab.load_tokenizer(tokenizer or DEFAULT_TOKENIZER)
        cfg = ModelConfig.from_name(preset)
        if tok.vocab_size > cfg.vocab_size:
            raise DataError(f"tokenizer {tokenizer or DEFAULT_TOKENIZER!r} has {tok.vocab_size} tokens, more than "
                            f"{source}'s vocabulary of {cfg.vocab_size}")
        torch.manual_seed(seed)
        model = Transformer(cfg).eval()
        with torch.no_grad():  # the default init (std 0.02) makes T5's position bias invisible: give it O(1) values
            for stack in (model.encoder, model.decoder):
                if stack is not None and stack.rel_bias is not None:
                    stack.rel_bias.weight.normal_(0.0, 1.0)
        return model, tok, source
    model = lmlab.load_model(source, dtype=dtype)
    tok = lmlab.load_tokenizer(tokenizer or source)
    return model, tok, source
