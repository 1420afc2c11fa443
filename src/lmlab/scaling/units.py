"""Numbers in and out of the scaling estimates: '125M' and '80GiB' parsed, bytes, counts and durations formatted,
and the argument checks every estimate shares (each failure is a one-line ``ConfigError`` naming the value)."""

from __future__ import annotations

import math
import re

from lmlab.errors import ConfigError, choices_error

_COUNT_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
_BYTE_SUFFIX = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
                "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"


def parse_count(text: str | float | int, what: str = "value") -> float:
    """'125M' -> 1.25e8, '2.5B' -> 2.5e9, '1e21' -> 1e21, '989T' -> 9.89e14 (K/M/B|G/T/P, powers of 1000)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUMBER + r"([a-zA-Z]?)\s*", str(text))
        if not m or m.group(2).upper() not in _COUNT_SUFFIX:
            raise ConfigError(f"{what}={text!r} is not a number; use e.g. 125M, 2.5B, 1.4T or 1e21 "
                              f"(suffixes: {', '.join(s for s in _COUNT_SUFFIX if s)})")
        value = float(m.group(1)) * _COUNT_SUFFIX[m.group(2).upper()]
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{what}={text!r} must be a positive number")
    return value


def parse_bytes(text: str | float | int, what: str = "memory") -> float:
    """'80GiB' -> 80 * 2**30, '80GB' -> 80e9, '24 GiB', '1024' (bytes). Binary (KiB..TiB) or decimal (KB..TB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)\s*", str(text))
        unit = (m.group(2) or "B").upper() if m else ""
        if not m or unit not in _BYTE_SUFFIX:
            raise ConfigError(f"{what}={text!r} is not a size; use e.g. 80GiB, 24GB or 512MiB")
        value = float(m.group(1)) * _BYTE_SUFFIX[unit]
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{what}={text!r} must be a positive size")
    return value


def format_bytes(n: float) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(n: float) -> str:
    """Decimal suffixes: 1.25e8 -> '125.0M', 1.4e12 -> '1.40T'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def format_flops(n: float) -> str:
    return f"{n:.3g} FLOPs"


def format_duration(seconds: float) -> str:
    """Seconds in the largest sensible unit: '3.2 h', '41.5 days', '2.1 years'."""
    for div, unit in ((365.25 * 86400, "years"), (86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= div:
            return f"{seconds / div:.1f} {unit}"
    return f"{seconds:.1f} s"


# --- argument checks ----------------------------------------------------------------------------------

def check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def check_choice(name: str, value: str, valid) -> str:
    if value not in valid:
        raise choices_error(name, value, valid)
    return value
