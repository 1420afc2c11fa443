"""Errors lmlab raises on bad input.

Every error names the offending value and, where there is a short list, what would be valid.
The CLI prints ``LmlabError`` messages as one line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class LmlabError(Exception):
    """Base class: a user-facing error with a one-line, actionable message."""


class ConfigError(LmlabError, ValueError):
    """A configuration field has an invalid value or an unknown key."""


class CheckpointError(LmlabError):
    """A checkpoint cannot be read: missing/extra keys, wrong shapes, truncated or unsupported files."""


class DataError(LmlabError, ValueError):
    """Input data is missing, malformed or does not fit (e.g. a prompt longer than the context window)."""


def choices_error(field: str, value, valid) -> ConfigError:
    """`field='x' is not valid; choose one of a, b, c`."""
    return ConfigError(f"{field}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")
