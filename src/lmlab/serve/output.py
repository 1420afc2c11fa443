"""The output step of serving: choose each sequence's next token from its logits, detokenize it, apply
stop strings (vLLM's split: the scheduler decides, ``runner.ModelRunner`` executes the model, this module
turns logits into tokens and text).

``SequenceOutput`` is what one running sequence keeps: its token history (prompt + generated ids, the
processor chain's input), its logits-processor chain (``lmlab.generation.build_processors``) and, when
sampling, its own seeded ``torch.Generator``, an incremental decoder, and how much text was sent.

* ``choose(logits)``: the processor chain, then argmax or one seeded draw: the same calls, in the same
  order, as ``lmlab.generate`` of the request alone, so greedy and seeded outputs match it.
* ``sample(outputs, logits)``: every row of a decode step; plain greedy rows take one batched argmax.
* ``append(token) -> (text, finish_reason)``: the new text that is safe to send (a possible start of a
  stop string is held back, a found one trimmed, as ``lmlab.generation.stream`` does) and why the
  sequence ended (``"stop"``: eos or a stop string; ``"length"``: ``max_new_tokens``), if it did.

Shapes: V vocabulary, A rows of a decode step, T tokens of the history.
"""

from __future__ import annotations

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.processors import build_processors
from lmlab.generation.stopping import held_back_length, trim_stop_strings
from lmlab.tokenizer import IncrementalDecoder


class SequenceOutput:
    """Sampling and detokenizing state of one sequence (see the module docstring)."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, tokenizer, device=None):
        T = len(prompt_ids)
        self.config = config
        self.history = torch.empty(1, T + config.max_new_tokens, dtype=torch.long, device=device)  # (1, T + new)
        self.history[0, :T] = torch.tensor(prompt_ids, dtype=torch.long)
        self.length = T  # ids in history so far
        self.prompt_length = T
        self.chain = build_processors(config, prompt_len=T, eos_token_ids=config.eos_token_ids or ())
        self.generator = None
        if config.sampling:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(config.seed if config.seed is not None else int(torch.randint(2**62, ()).item()))
        self.eos = set(config.eos_token_ids or ())
        self.decoder = IncrementalDecoder(tokenizer)
        self.full_text = ""  # decoded text, stop strings not yet trimmed
        self.sent = 0  # characters of full_text already returned by append()

    @property
    def prompt(self) -> torch.Tensor:
        """The prompt ids (T,)."""
        return self.history[0, :self.prompt_length]

    @property
    def last_token(self) -> int:
        """The id the next decode step feeds in (the last one in the history)."""
        return int(self.history[0, self.length - 1])

    @property
    def generated(self) -> int:
        return self.length - self.prompt_length

    @property
    def plain_greedy(self) -> bool:
        """No processors and no sampling: the token is the argmax, taken for the whole batch at once."""
        return self.generator is None and not len(self.chain)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits (V,): its processor chain, then argmax or a seeded draw."""
        scores = logits[None]  # (1, V)
        if len(self.chain):
            scores = self.chain(self.history[:, :self.length], scores.float())
        if self.generator is not None:
            return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
        return int(scores.argmax(-1))

    def append(self, token: int) -> tuple[str, str | None]:
        """Record `token` -> (new text safe to send, finish reason or None while the sequence goes on)."""
        self.history[0, self.length] = token
        self.length += 1
        stops = self.config.stop_strings
        reason = None
        if token in self.eos:
            self.full_text += self.decoder.flush()
            reason = "stop"
        else:
            self.full_text += self.decoder.push(token)
            if self.generated >= self.config.max_new_tokens:
                self.full_text += self.decoder.flush()
                reason = "length"
        text = self.full_text
        if stops:
            cut = trim_stop_strings(text, stops)
            if len(cut) < len(text):
                text, reason = cut, "stop"
        safe = len(text) if (reason or not stops) else len(text) - held_back_length(text, stops)
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, reason


def sample(outputs: list[SequenceOutput], logits: torch.Tensor) -> list[int | Exception]:
    """The next token of each row of a decode step (logits (A, V), row i is outputs[i]) -> a token id per
    row, or the exception choosing it raised (it ends that sequence alone)."""
    greedy = logits.argmax(-1).tolist() if any(o.plain_greedy for o in outputs) else None  # (A,) in one call
    tokens: list[int | Exception] = []
    for row, out in enumerate(outputs):
        try:
            tokens.append(greedy[row] if out.plain_greedy else out.choose(logits[row]))
        except Exception as exc:
            tokens.append(exc)
    return tokens
