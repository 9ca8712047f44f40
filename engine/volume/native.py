"""The C engine (csrc/, built by engine/_native_build.py) and the request path's bound calls."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BlockrepError


def _native():
    try:
        from .. import _native
    except ImportError as e:  # pragma: no cover - only without a build
        raise BlockrepError(
            f"the C extension is not built ({e}); run scripts/bootstrap.sh or make build") from None
    return _native


@dataclass(frozen=True)
class RequestCalls:
    """See Volume.request_calls."""

    read: object
    snapshot_read: object
    write: object
    zero: object
    flush: object
    from_buffer: object
    last_error: object
