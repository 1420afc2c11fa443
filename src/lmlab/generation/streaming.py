"""Streaming: the text of one generation, yielded in deltas as the tokens are produced.

Two things make this more than decoding each token: a multi-byte character can be split across tokens
(``lmlab.tokenizer.IncrementalDecoder`` holds it back until it completes), and text that might be the
start of a stop string must not be shown until it is known not to be one (``held_back_length``).
The concatenated deltas equal ``generate(model, tokenizer, prompt, config)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.decode import encode_prompts, generate, resolve_config, sample_steps
from lmlab.generation.driver import prepare_inputs
from lmlab.generation.stopping import held_back_length, trim_stop_strings


def _incremental_decoder(tokenizer):
    from lmlab.tokenizer import IncrementalDecoder

    return IncrementalDecoder(tokenizer)


def stream(model, tokenizer, prompt: str, config: GenerationConfig | None = None, **overrides: Any) -> Iterator[str]:
    """Yield the text of one generation as it is produced, in deltas whose concatenation equals
    ``generate(model, tokenizer, prompt, config)``.

    Text that might be the start of a stop string is held back until it is known not to be one.
    Beam search cannot know its result before the end, so it yields the whole text at once.
    """
    config = resolve_config(model, config, tokenizer, **overrides)
    if config.num_beams > 1:
        yield generate(model, tokenizer, prompt, config)
        return
    ids, _ = encode_prompts(tokenizer, [prompt])
    decoder = _incremental_decoder(tokenizer)
    stops = config.stop_strings
    text, sent = "", 0  # all text so far, and how much of it was yielded
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, _ = prepare_inputs(model, ids, None, config)
        eos = set(config.eos_token_ids or [])
        for tokens, done in _in_inference_mode(sample_steps(model, ids, None, config, tokenizer)):
            token = int(tokens[0])
            if token not in eos:  # eos ends the text; it is never shown
                text += decoder.push(token)
            if stops:
                cut = trim_stop_strings(text, stops)
                if len(cut) < len(text):  # a stop string appeared: yield up to it and end
                    if len(cut) > sent:
                        yield cut[sent:]
                    return
                safe = len(text) - held_back_length(text, stops)
            else:
                safe = len(text)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if bool(done[0]):
                break
        text += decoder.flush()
        text = trim_stop_strings(text, stops)
        if len(text) > sent:
            yield text[sent:]
    finally:
        model.train(was_training)


def _in_inference_mode(steps: Iterator) -> Iterator:
    """Run each step of a generator under ``torch.inference_mode()``, but not the caller's code between steps."""
    while True:
        with torch.inference_mode():
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item
