"""Pure replication decisions (docs/REPLICATION.md §1): the common base by identity, the mode, and
whether an interrupted run may resume. No I/O: unit-tested as a table (tests/test_replication_plan.py),
the way zrepl tests its IncrementalPath.

    primary:  a ── b ── c ── S          DR holds uuids {a, b}:   base b, incremental
    primary:  a ── b ── S               DR holds {x} (bound to us, has data): rebase
    primary:  a ── S                    DR empty and unbound:    seed
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import BlockrepError


class Conflict(BlockrepError):
    """The target cannot receive this snapshot as it is (wrong volume, foreign, name taken).
    Nothing was written; the message says what --force would do, where it can do anything."""


@dataclass(frozen=True)
class Plan:
    mode: str  # seed | incremental | rebase | done
    base: dict | None = None  # the primary snapshot both sides hold (name, uuid)
    note: str = ""


def common_base(snapshots: list[dict], snapshot: dict, held_uuids: set[str]) -> dict | None:
    """The newest of the primary's snapshots older than `snapshot` whose uuid the target holds."""
    older = snapshots[: [s["uuid"] for s in snapshots].index(snapshot["uuid"])]
    for s in reversed(older):
        if s["uuid"] in held_uuids:
            return s
    return None


def check_target(own_volume: str, dr: dict, *, force: bool = False) -> None:
    """Refuse (Conflict) a blockrep target that is this volume, another primary's DR, or a volume
    with data of its own (unless force): before any snapshot is taken or byte written."""
    if dr.get("volume") == own_volume:
        raise Conflict("the target is this volume itself: replicating a volume into itself would "
                       "overwrite it with an older state")
    dr_snaps = dr.get("snapshots") or []
    promoted = dr.get("promoted") or {}
    if promoted.get("from") == own_volume:
        raise Conflict(f"the target was promoted (failover, from snapshot {promoted.get('snapshot')} at "
                       f"{promoted.get('at')}): its live volume is in use there and takes no more deltas from "
                       "this volume (not even with --force); to fail back, `blockrep demote` this volume "
                       "with --primary pointing at it")
    bound = dr.get("bound_to")
    if bound and bound != own_volume and not force:
        raise Conflict(f"the target is a DR of another primary volume ({bound}); --force rebinds it to "
                       f"this one and overwrites its head (its {len(dr_snaps)} snapshot(s) are kept)")
    if not bound and (dr.get("has_data") or dr_snaps) and not force:
        names = ", ".join(s["name"] for s in dr_snaps[:5]) or "none"
        raise Conflict(f"the target volume {dr.get('volume')} holds data of its own (snapshots: {names}); "
                       "--force binds it to this volume and overwrites its head (its snapshots are kept)")
    t = dr.get("transfer")
    if t and t.get("live"):
        raise Conflict(f"the DR is receiving another transfer (snapshot {t.get('name')}, since {t.get('started')})")


def for_blockrep(snapshots: list[dict], snapshot: dict, own_volume: str, dr: dict, *,
                 full: bool = False, force: bool = False, progress: dict | None = None) -> Plan:
    """The plan for a blockrep DR described by its !hello reply. progress: this primary's
    record of an interrupted run to it (replication.json in_progress), if any."""
    check_target(own_volume, dr, force=force)
    dr_snaps = dr.get("snapshots") or []
    held = {s["uuid"] for s in dr_snaps}
    if snapshot["uuid"] in held:
        return Plan("done", note="already replicated")
    for s in dr_snaps:
        if s["name"] == snapshot["name"]:
            raise Conflict(f"the DR already holds a different snapshot named {snapshot['name']} "
                           f"(uuid {s['uuid']}, this one is {snapshot['uuid']}); DR snapshots are never "
                           "replaced: ship it under another name")
    bound = dr.get("bound_to")
    if full:
        return Plan("seed", note="--full")
    base = common_base(snapshots, snapshot, held) if bound == own_volume else None
    if base is not None:
        return Plan("incremental", base)
    if dr.get("has_data"):
        # A seed of this very snapshot that was *paused* (a pause confirms all it can: beyond the
        # prefix the DR holds at most what was in flight) and whose transfer the DR still holds:
        # resume the seed after the prefix (a rebase would read both whole volumes for digests at
        # every resume: each night of a multi-night seed paused by its window). A killed seed may
        # have written far beyond its prefix: rebase,
        # which sends only the chunks that differ.
        t = dr.get("transfer") or {}
        if (progress and progress.get("mode") == "seed" and progress.get("clean")
                and progress.get("snapshot_uuid") == snapshot["uuid"]
                and bound == own_volume and t.get("snapshot") == snapshot["uuid"]):
            return Plan("seed", note="resuming the interrupted seed")
        return Plan("rebase", note="no common snapshot: compare digests and send what differs")
    return Plan("seed")


def for_plain(snapshots: list[dict], snapshot: dict, record: dict, fingerprint_ok: bool, *,
              full: bool = False) -> Plan:
    """The plan for any other NBD server, from this primary's record of it."""
    if full:
        return Plan("seed", note="--full")
    here = record.get("snapshot_uuid") == snapshot["uuid"] == record.get("head_uuid")
    if here and fingerprint_ok:
        return Plan("done", note="already replicated")
    base_uuid = record.get("snapshot_uuid")
    base = common_base(snapshots, snapshot, {base_uuid}) if base_uuid else None
    if base is None:
        return Plan("seed", note="no snapshot of this volume is known to be there" if base_uuid is None
                    else "the snapshot the target holds is gone here")
    if record.get("head_uuid") != base_uuid:
        return Plan("seed", note="an earlier transfer left the target in between")
    if not fingerprint_ok:
        return Plan("seed", note="the target's data changed since the last run (fingerprint)")
    return Plan("incremental", base)


def extents_digest(extents: list[tuple[int, int]]) -> str:
    return hashlib.sha256(json.dumps(extents).encode()).hexdigest()


def resume_point(progress: dict | None, snapshot_uuid: str, base_uuid: str | None, mode: str,
                 extents: list[tuple[int, int]]) -> tuple[int, str | None]:
    """(plan bytes already confirmed, token) of an interrupted run of the same transfer, else (0, None)."""
    if not progress:
        return 0, None
    same = (progress.get("snapshot_uuid"), progress.get("base_uuid"), progress.get("mode")) == \
        (snapshot_uuid, base_uuid, mode) and progress.get("extents_sha256") == extents_digest(extents)
    if not same:
        return 0, None
    return int(progress.get("done_upto") or 0), progress.get("token")
