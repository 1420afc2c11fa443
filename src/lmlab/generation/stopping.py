"""Stop strings: detecting them while decoding, trimming them from the text, holding back a partial one.

A stop string is text, not a token: it may span several tokens, or end inside one. So the loop decodes
a short window of each row's recent tokens (``stop_checker``), the final text is cut at the first
occurrence (``trim_stop_strings``), and a stream holds back the tail that could still become one
(``held_back_length``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmlab.errors import DataError


def stop_checker(tokenizer, stop_strings: Sequence[str]):
    """-> fn(new_tokens (B, n), active (B,) bool) -> (B,) bool: rows whose recent text contains a stop string.

    Leading whitespace of the output does not count (see ``trim_stop_strings``). Past the first few
    tokens only a window is decoded: a stop string of c characters spans at most c tokens, plus a margin
    for tokens that decode to partial characters."""
    if not stop_strings:
        return None
    if tokenizer is None:
        raise DataError(f"stop_strings={list(stop_strings)!r} need a tokenizer to decode the text")
    window = max(len(s) for s in stop_strings) + 4

    def check(new_tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros(new_tokens.shape[0], dtype=torch.bool)
        recent = new_tokens[:, -window:].tolist()
        from_start = new_tokens.shape[1] <= window  # the window still holds the whole output
        for row, on in enumerate(active.tolist()):
            if on:
                text = tokenizer.decode(recent[row], skip_special_tokens=True)
                hit[row] = any(s in (text.lstrip() if from_start else text) for s in stop_strings)
        return hit.to(new_tokens.device)

    return check


def trim_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any stop string (the stop string is removed too).

    Occurrences inside the leading whitespace do not count: a model that starts its answer with a
    blank line should not be stopped by a "\\n\\n" stop string before it says anything.
    """
    start = len(text) - len(text.lstrip())
    cut = min((i for i in (text.find(s, start) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
