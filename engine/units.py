"""Sizes with K/M/G/T suffixes (powers of 1024), as the command-line contract says."""

import re

from .errors import InvalidArgument

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'10G' -> 10737418240. Raises InvalidArgument naming `what` for anything else."""
    m = _RE.match(str(text))
    if not m:
        raise InvalidArgument(f"invalid {what} {text!r}: use a number with an optional K, M, G or T suffix")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def format_size(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_DUR = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DUR_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str, what: str = "duration") -> int:
    """'7d' -> 604800 seconds (s, m, h, d, w; a bare number is seconds)."""
    m = _DUR_RE.match(str(text))
    if not m:
        raise InvalidArgument(f"invalid {what} {text!r}: use a number with an optional s, m, h, d or w suffix")
    return int(m.group(1)) * _DUR[m.group(2)]
