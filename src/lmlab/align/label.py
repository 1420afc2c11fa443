"""``lmlab prefs label``: a person picks the better of two summaries in the terminal; the choice is appended.

The input is a preferences JSONL file used as a list of *candidate pairs* (from ``lmlab prefs build``, or
two experiments' outputs put side by side): its chosen/rejected labels are ignored. Each pair is shown as
the dialogue and two summaries in a random order (seeded per pair), without their sources, and the person
answers ``1``, ``2``, ``s`` (skip) or ``q`` (quit). A choice appends a record to the output file with the
picked summary as ``chosen``; its ``source`` says it was labeled by a person and keeps the candidate's
source for bookkeeping. Pairs already labeled in the output file are not shown again, so a session can
stop at any time and continue later. It reads answers line by line, so it works with piped stdin.
"""

from __future__ import annotations

import random
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from lmlab.align.prefs import PreferencePair, append_preference, read_preferences
from lmlab.errors import ConfigError

ANSWERS = {"1": 0, "2": 1, "s": None, "skip": None}
QUIT = ("q", "quit")


@dataclass
class LabelResult:
    labeled: int
    skipped: int
    already: int  # candidates labeled in an earlier session
    remaining: int  # candidates not answered (quit or end of input)


def _key(prompt: str, a: str, b: str) -> tuple[str, frozenset]:
    return prompt, frozenset((a, b))


def shown_order(pair: PreferencePair, seed: int) -> tuple[str, str]:
    """The two summaries in the order shown: a coin flip per pair from the seed and its texts."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32((pair.prompt + pair.chosen + pair.rejected).encode()))
    return (pair.chosen, pair.rejected) if rng.random() < 0.5 else (pair.rejected, pair.chosen)


def label_pairs(candidates: str | Path, out: str | Path, read: Callable[[], str] | TextIO, write: Callable[[str], None],
                seed: int = 0, width: int = 100) -> LabelResult:
    """Show each unlabeled candidate, read an answer per pair, append the person's choices to `out`."""
    candidates, out = Path(candidates), Path(out)
    if candidates.resolve() == out.resolve():
        raise ConfigError(f"--out {str(out)!r} is the candidates file; write the labels to another file")
    pairs = read_preferences(candidates)
    labeled_keys = {_key(p.prompt, p.chosen, p.rejected) for p in read_preferences(out)} if out.exists() else set()
    todo = [p for p in pairs if _key(p.prompt, p.chosen, p.rejected) not in labeled_keys]
    already = len(pairs) - len(todo)
    readline = read.readline if hasattr(read, "readline") else read
    labeled = skipped = 0
    write(f"{len(todo)} pair(s) to label ({already} already in {out}); answer 1, 2, s (skip) or q (quit)\n")
    for n, pair in enumerate(todo, 1):
        first, second = shown_order(pair, seed)
        write(f"\n=== pair {n} of {len(todo)} ===\n")
        write(textwrap.indent(pair.prompt.strip(), "  ") + "\n")
        for i, text in enumerate((first, second), 1):
            write(f"\n[{i}] " + textwrap.fill(" ".join(text.split()), width, subsequent_indent="    ") + "\n")
        while True:
            write("\nwhich summary is better? [1/2/s/q] ")
            line = readline()
            if line == "":  # end of input: stop as if quit
                return LabelResult(labeled, skipped, already, len(todo) - labeled - skipped)
            answer = line.strip().lower()
            if answer in QUIT:
                return LabelResult(labeled, skipped, already, len(todo) - labeled - skipped)
            if answer in ANSWERS:
                break
            write(f"{answer!r} is not an answer; type 1, 2, s or q\n")
        pick = ANSWERS[answer]
        if pick is None:
            skipped += 1
            continue
        chosen, rejected = (first, second) if pick == 0 else (second, first)
        source = "human label" + (f" ({pair.source})" if pair.source else "")
        append_preference(out, PreferencePair(pair.prompt, chosen, rejected, source))
        labeled += 1
    return LabelResult(labeled, skipped, already, 0)
