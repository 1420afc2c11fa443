"""Chunking: split a document into pieces that each fit the encoder's window.

A dialogue is split between turns (one turn per line, ``#Person1#: ...``), packing consecutive turns
into a chunk while the chunk stays within ``max_tokens`` encoder tokens, so a chunk never cuts a turn
in half. A single turn longer than the window is split between words. Every token of the document is
in exactly one chunk (no overlap), so nothing falls past the encoder's window.
"""

from __future__ import annotations

from collections.abc import Callable


def _split_long(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """A text longer than the window -> pieces split between words, each within `max_tokens`."""
    pieces, words = [], text.split(" ")
    current: list[str] = []
    for word in words:
        if current and count_tokens(" ".join(current + [word])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(word)  # a single word longer than the window is left to the encoder's truncation
    if current:
        pieces.append(" ".join(current))
    return pieces


def chunk_turns(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """`text` -> chunks of whole turns (lines), each at most `max_tokens` by `count_tokens`.

    A text that fits is one chunk (itself). Empty lines are dropped from the turn list.
    """
    if count_tokens(text) <= max_tokens:
        return [text]
    turns = [t for t in text.split("\n") if t.strip()]
    chunks: list[str] = []
    current: list[str] = []
    for turn in turns:
        if count_tokens(turn) > max_tokens:  # one turn alone overflows: flush, then split it by words
            if current:
                chunks.append("\n".join(current))
                current = []
            chunks.extend(_split_long(turn, count_tokens, max_tokens))
            continue
        if current and count_tokens("\n".join(current + [turn])) > max_tokens:
            chunks.append("\n".join(current))
            current = []
        current.append(turn)
    if current:
        chunks.append("\n".join(current))
    return chunks
