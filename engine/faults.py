"""Test hooks of the engine's system-call layer (csrc/io.h): fail the Nth pwrite, fdatasync,
openat... with an errno (RELIABILITY R7), and record every such call to build the states a power
cut could leave (R4). Process-wide; production never sets them. The plugin takes
``io_fault=SPEC`` (see `parse`) so that a real nbdkit can be made to fail its disk."""

from __future__ import annotations

import errno as _errno

from .errors import InvalidArgument

OPS = {"pwrite": 1, "fdatasync": 2, "fsyncdir": 4, "openat": 8, "renameat": 16, "unlinkat": 32,
       "ftruncate": 64, "mkdirat": 128, "punch": 256}
ALL = 511


def _lib():
    from . import _native
    return _native.lib


def inject(mask: int, nth: int, err: int = _errno.EIO, persistent: bool = False) -> None:
    """Fail the nth call (1-based) whose op is in mask; nth = 0 turns injection off."""
    _lib().vol_io_fault(mask, nth, err, 1 if persistent else 0)


def off() -> None:
    _lib().vol_io_fault(0, 0, 0, 0)


def calls() -> int:
    """Matching calls since the last inject()."""
    return _lib().vol_io_calls()


def failures() -> int:
    return _lib().vol_io_failures()


def parse(spec: str) -> tuple[int, int, int, bool]:
    """"OP[+OP…]:N[:ERRNO[:persistent]]", e.g. "pwrite:3:EIO" or "fdatasync+pwrite:1:ENOSPC:persistent"."""
    parts = spec.split(":")
    try:
        mask = ALL if parts[0] == "all" else sum(OPS[o] for o in parts[0].split("+"))
        nth = int(parts[1])
        err = getattr(_errno, parts[2]) if len(parts) > 2 else _errno.EIO
        persistent = len(parts) > 3 and parts[3] == "persistent"
    except (IndexError, KeyError, ValueError, AttributeError):
        raise InvalidArgument(f"bad io_fault {spec!r}: use OP[+OP]:N[:ERRNO[:persistent]] with OP in "
                              f"{', '.join(OPS)} or all") from None
    if nth < 0 or not isinstance(err, int):
        raise InvalidArgument(f"bad io_fault {spec!r}")
    return mask, nth, err, persistent
