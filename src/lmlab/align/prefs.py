"""Preference pairs: the JSONL format that the reward model and DPO train on.

One record per line::

    {"prompt": "<the task input>", "chosen": "<preferred response>", "rejected": "<other response>",
     "source": "<optional: where the pair came from>"}

``prompt`` is the *task input* (for DialogSum, the dialogue text), not a rendered model prompt: each
trainer builds the model prompt from it with ``lmlab.prompting`` exactly as fine-tuning does, so one
pairs file serves models with different prompt recipes. ``source`` is free text (e.g.
``"dev_12 human>base-zero-shot@T0.9"`` or ``"compare-tab"``) and is carried through untouched.

Records are validated when read; a bad one raises ``DataError`` naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import DataError
from lmlab.jsonl import iter_objects

# Used by `lmlab prefs build` (lmlab.align.build) and `lmlab extract`; defined here, in a module that does not
# import torch, so that building those commands' parsers stays fast.
POLICIES = ("base", "finetuned")  # whose sample is the rejected summary of a pair
DEFAULT_DATA = "../shared/data/dialogsum/dev.jsonl"  # labeled dialogues: DialogSum dev beside the clone

REQUIRED = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: str | None = None
    line: int = 0  # 1-based line in the file it was read from; 0 for a pair made in memory

    def to_record(self) -> dict:
        """The JSONL object for this pair (``line`` is where it was read, not part of the record)."""
        record = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.source is not None:
            record["source"] = self.source
        return record


def validate_record(record: dict, where: str, line: int = 0) -> PreferencePair:
    """One parsed object -> PreferencePair; ``where`` ("file:line") prefixes every error."""
    for key in REQUIRED:
        if key not in record:
            raise DataError(f"{where}: preference record is missing {key!r} (it needs {', '.join(REQUIRED)})")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    source = record.get("source")
    if source is not None and not isinstance(source, str):
        raise DataError(f"{where}: 'source' must be a string or absent, got {type(source).__name__}")
    for key in REQUIRED:
        if not record[key].strip():
            raise DataError(f"{where}: {key!r} is empty")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, so the pair prefers nothing")
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], source, line)


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Every pair in a preferences JSONL file, validated; blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"preferences file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"preferences path {str(path)!r} is a directory; pass a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {exc.start})") from None
    pairs = [validate_record(record, f"{path}:{lineno}", lineno)
             for lineno, record in iter_objects(text.splitlines(), str(path))]
    return pairs


def append_preference(path: str | Path, pair: PreferencePair) -> None:
    """Append one validated pair as a JSONL line, flushed and fsynced so an interrupted session keeps it.

    A file whose last line lacks its newline (a crash mid-write by another tool) gets one first, so the
    new record never glues onto a partial line.
    """
    validate_record(pair.to_record(), f"pair for {str(path)!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(pair.to_record(), ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
