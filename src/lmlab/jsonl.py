"""Reading JSON Lines: one object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from lmlab.errors import DataError


def parse_object(line: str, where: str) -> dict:
    """One JSONL line -> dict; `where` ("file:line") prefixes the error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_objects(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; `name` is the file named in errors."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield lineno, parse_object(line, f"{name}:{lineno}")
