"""Streaming detokenization: token ids in, text pieces out, correct across split characters."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmlab.tokenizer.wrapper import Tokenizer


class IncrementalDecoder:
    """Turn a stream of token ids into a stream of text pieces, for printing while generating.

    Decoding one token at a time is wrong in two ways: a multi-byte UTF-8 character can be split across
    tokens (each half decodes to U+FFFD), and some decoders drop a leading space when a token is decoded
    alone. So we decode a short window of recent ids and emit only the text past what was already emitted;
    text ending in U+FFFD is held back until the character completes. ``"".join(pushes) + flush()`` equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids before it are settled
        self.read_offset = 0  # ids[:read_offset] have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            new = text[len(emitted):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD) and reset."""
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.ids, self.prefix_offset, self.read_offset = [], 0, 0
        return text[len(emitted):]
