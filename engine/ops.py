"""The commands that read or change a volume, written once against an open Volume.

The CLI runs them on a volume it opened itself (not served), and the server's control socket
runs the very same functions on the volume it serves (engine/control.py): the user types the same
command either way. Every function takes JSON-able arguments and returns JSON-able results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import AlreadyExists
from .volume import BLOCK, Volume, default_snapshot_name, validate_snapshot_name


def snapshot_create(vol: Volume, name: str | None = None) -> dict:
    return vol.snapshot_create(default_snapshot_name() if name is None else validate_snapshot_name(name))


def snapshot_list(vol: Volume) -> list[dict]:
    """Oldest first, each with the bytes changed since the previous snapshot (or since the
    volume was created) and the bytes only it keeps on disk (pinned)."""
    snaps = vol.snapshots()
    prev = None
    for s in snaps:
        s["changed_bytes"] = sum(n for _, n in vol.diff_ids(prev, s["id"]))
        s["pinned_bytes"] = vol.snapshot_pinned(s["id"])
        prev = s["id"]
    return snaps


def snapshot_delete(vol: Volume, name: str) -> None:
    vol.snapshot_delete(validate_snapshot_name(name))


def snapshot_prune(vol: Volume, keep: int) -> list[str]:
    """Delete the oldest snapshots beyond the newest `keep`; returns the names deleted."""
    names = [s["name"] for s in vol.snapshots()]
    doomed = names[: max(0, len(names) - keep)]
    for n in doomed:
        vol.snapshot_delete(n)
    return doomed


def diff(vol: Volume, from_name: str | None, to_name: str) -> list[dict]:
    """Changed extents from snapshot from_name (None: since the volume was created) to to_name."""
    to = vol.snapshot(validate_snapshot_name(to_name))
    if from_name is None:
        ext = vol.diff_ids(None, to["id"])
    else:
        validate_snapshot_name(from_name)
        ext = vol.diff(from_name, to_name)
    return [{"offset": o, "length": n} for o, n in ext]


def pending(vol: Volume, since: str) -> int:
    """Bytes the head changed since snapshot `since` (what the next replication would ship)."""
    return sum(n for _, n in vol.diff_ids(vol.snapshot(validate_snapshot_name(since))["id"], 0))


def info(vol: Volume) -> dict:
    res = vol.info()
    res["snapshots"] = snapshot_list(vol)
    res["pinned_bytes"] = sum(s["pinned_bytes"] for s in res["snapshots"])
    return res


def flush(vol: Volume) -> None:
    """Make every acknowledged write durable and checkpoint (before a stop that must kill)."""
    vol.flush()
    vol.checkpoint()


READ_ONLY = frozenset({"snapshot_list", "diff", "pending", "info"})


def _check_new_name(vol: Volume, name: str | None = None) -> None:
    if name is not None and any(s["name"] == validate_snapshot_name(name) for s in vol.snapshots()):
        raise AlreadyExists(f"a snapshot named {name} already exists in {vol.path}")


def _check_exists(vol: Volume, name: str) -> None:
    vol.snapshot(validate_snapshot_name(name))


# Checks that a changing command runs first on a volume opened read-only, so that bad input is
# refused before anything is written (an unserved volume is otherwise opened read-write).
PRECHECKS: dict[str, Callable[..., Any]] = {
    "snapshot_create": _check_new_name,
    "snapshot_delete": _check_exists,
}

COMMANDS: dict[str, Callable[..., Any]] = {
    "snapshot_create": snapshot_create,
    "snapshot_list": snapshot_list,
    "snapshot_delete": snapshot_delete,
    "snapshot_prune": snapshot_prune,
    "diff": diff,
    "pending": pending,
    "info": info,
    "flush": flush,
}

__all__ = ["COMMANDS", "BLOCK"]
