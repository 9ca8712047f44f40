"""The commands that read or change a volume, written once against an open Volume.

The CLI runs them on a volume it opened itself (not served), and the server's control socket
runs the very same functions on the volume it serves (engine/control.py): the user types the same
command either way. Every function takes JSON-able arguments and returns JSON-able results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .errors import AlreadyExists, BlockrepError, InvalidArgument, Protected
from .replication import retention
from .replication import state as rstate
from .replication.gfs import check_counts
from .volume import BLOCK, Volume, default_snapshot_name, validate_snapshot_name

log = logging.getLogger("blockrep.ops")


def snapshot_create(vol: Volume, name: str | None = None, tag: bool = False, uuid: str | None = None,
                    holder: str | None = None, created: str | None = None) -> dict:
    """tag: made by `replicate` (retention may prune it with --keep-local); uuid: an identity to
    carry (restore gives the head the identity of the DR snapshot it now equals); holder: the
    token of a restore/rollback/promote holding the head (a server refuses other snapshots then:
    DRServer.snapshot_create; a volume nobody serves has no holder); created: ISO 8601 time to
    record instead of now (a received stream's snapshot keeps its source's)."""
    ns = None
    if created is not None:
        try:
            ns = int(rstate.parse_time(created).timestamp() * 1e9)
        except (TypeError, ValueError, AttributeError, OverflowError):
            raise InvalidArgument(f"created must be an ISO 8601 time, not {str(created)[:40]!r}") from None
    return vol.snapshot_create(default_snapshot_name() if name is None else validate_snapshot_name(name), ns,
                               flags=retention.FLAG_REPLICATE if tag else 0, uuid=uuid)


def _origin(s: dict) -> str:
    if s.get("flags", 0) & 2:
        return "dr"
    return "replicate" if s.get("flags", 0) & retention.FLAG_REPLICATE else "user"


def _keep_safe(vol: Volume, snaps: list[dict]) -> dict[str, str]:
    why = retention.protected(snaps, rstate.load(vol.path)["targets"])
    from .replication.drserver import read_role
    pr = read_role(vol.path)["promoted"]
    if pr and pr.get("snapshot"):  # what the old primary holds too: failback's common base
        why.setdefault(pr["snapshot"], "the snapshot this volume was promoted from (the base of failback)")
    return why


def snapshot_list(vol: Volume) -> list[dict]:
    """Oldest first, each with the bytes changed since the previous snapshot (or since the
    volume was created) and the bytes only it keeps on disk (pinned)."""
    snaps = vol.snapshots()
    prev = None
    for s in snaps:
        s["origin"] = _origin(s)
        s["changed_bytes"] = sum(n for _, n in vol.diff_ids(prev, s["id"]))
        s["pinned_bytes"] = vol.snapshot_pinned(s["id"])
        prev = s["id"]
    return snaps


def snapshot_delete(vol: Volume, name: str, force: bool = False) -> None:
    """Refuses (Protected) a snapshot replication still needs, unless force."""
    _check_delete(vol, name, force)
    vol.snapshot_delete(name)


def snapshot_prune(vol: Volume, keep: int | None = None, force: bool = False, only_tagged: bool = False,
                   gfs: dict | None = None) -> dict:
    """Delete the oldest snapshots beyond the policy (only those `replicate` made, with
    only_tagged), keeping those replication needs unless force. The policy: the newest `keep`;
    with gfs ({"hourly": H, "daily": D, "weekly": W, "monthly": M}, any subset) the GFS rules in
    this host's local time plus the newest `keep` (0 if None). Returns {"deleted": [...],
    "kept": {name: why (protected)}, "retained": {name: which rule keeps it}}."""
    if keep is None and gfs is None:
        raise InvalidArgument("say what to keep: keep=N and/or GFS counts (hourly, daily, weekly, monthly)")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise InvalidArgument("keep must be 0 or more")
    gfs = check_counts(gfs)
    snaps = vol.snapshots()
    plan = retention.plan(snaps, keep or 0, {} if force else _keep_safe(vol, snaps), only_tagged=only_tagged,
                          gfs=gfs)
    for n in plan.delete:
        vol.snapshot_delete(n)
    return {"deleted": plan.delete, "kept": plan.kept, "retained": plan.retained}


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


def changes_since(vol: Volume, since: str) -> list[dict]:
    """Extents the head changed since snapshot `since` (at 4 KiB)."""
    ext = vol.diff_ids(vol.snapshot(validate_snapshot_name(since))["id"], 0, granularity=BLOCK)
    return [{"offset": o, "length": n} for o, n in ext]


def info(vol: Volume) -> dict:
    res = vol.info()
    res["snapshots"] = snapshot_list(vol)
    res["pinned_bytes"] = sum(s["pinned_bytes"] for s in res["snapshots"])
    return res


def flush(vol: Volume) -> None:
    """Make every acknowledged write durable and checkpoint (before a stop that must kill). On
    the image backend first drain the change log into the image, so that the image alone is
    the volume once the server is gone (a stop that must SIGKILL would cut the close's drain)."""
    vol.flush()
    if vol.has_mover:
        try:
            vol.drain()
        except BlockrepError as e:  # the change log keeps the blocks: durable all the same
            log.warning("stop: the change log could not be drained into the image: %s", e)
    vol.checkpoint()


READ_ONLY = frozenset({"snapshot_list", "diff", "pending", "info", "changes_since"})


def _check_new_name(vol: Volume, name: str | None = None, **_) -> None:
    if name is not None and any(s["name"] == validate_snapshot_name(name) for s in vol.snapshots()):
        raise AlreadyExists(f"a snapshot named {name} already exists in {vol.path}")


def _check_exists(vol: Volume, name: str, **_) -> None:
    vol.snapshot(validate_snapshot_name(name))


def _check_delete(vol: Volume, name: str, force: bool = False) -> None:
    vol.snapshot(validate_snapshot_name(name))
    if not force:
        why = _keep_safe(vol, vol.snapshots()).get(name)
        if why:
            raise Protected(f"snapshot {name} is {why}: deleting it makes the next run there send more "
                            "(use --force to delete it anyway)")


# Checks that a changing command runs first on a volume opened read-only, so that bad input is
# refused before anything is written (an unserved volume is otherwise opened read-write).
PRECHECKS: dict[str, Callable[..., Any]] = {
    "snapshot_create": _check_new_name,
    "snapshot_delete": _check_delete,
}

COMMANDS: dict[str, Callable[..., Any]] = {
    "snapshot_create": snapshot_create,
    "snapshot_list": snapshot_list,
    "snapshot_delete": snapshot_delete,
    "snapshot_prune": snapshot_prune,
    "diff": diff,
    "pending": pending,
    "changes_since": changes_since,
    "info": info,
    "flush": flush,
}

__all__ = ["COMMANDS", "BLOCK"]
