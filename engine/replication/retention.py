"""Which snapshots may be pruned (docs/REPLICATION.md §4, §6). Pure functions over snapshot lists and
replication records, unit-tested without servers (tests/test_replication_plan.py,
tests/test_retention_gfs.py). The policy (a count, or GFS rules: gfs.py) says what to keep; the
protection below says what must stay whatever the policy says.

Kept unless forced: the newest common base of every target that replicated successfully within
BASE_WINDOW, every snapshot `replicate` made (flag FLAG_REPLICATE) that is newer than such a
base (that target has not received it yet; zrepl calls these keep-not-replicated), and the
snapshot a run is shipping (or an interrupted run will resume).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import NamedTuple

from .gfs import check_counts, describe, gfs_keep, parse_time

FLAG_REPLICATE = 1  # snapshot flag bit 0: created by `replicate` (or the scheduler)
FLAG_DR = 2  # snapshot flag bit 1: committed by a DR transfer (drserver.FLAG_REPLICATED)
BASE_WINDOW = _dt.timedelta(days=30)


def protected(snapshots: list[dict], targets: dict[str, dict], now: _dt.datetime | None = None) -> dict[str, str]:
    """name -> why it must be kept. snapshots oldest first (name, uuid, flags); targets as in
    replication.json (snapshot_uuid, replicated_at)."""
    now = now or _dt.datetime.now(_dt.UTC)
    pos = {s["uuid"]: i for i, s in enumerate(snapshots)}
    why: dict[str, str] = {}
    for uri, t in sorted(targets.items()):
        moving = (t.get("in_progress") or {}).get("snapshot_uuid")
        if moving in pos:  # being shipped, or interrupted: the next run resumes it
            why.setdefault(snapshots[pos[moving]]["name"], f"being replicated to {uri}")
        at = parse_time(t.get("replicated_at"))
        base = t.get("snapshot_uuid")
        if base not in pos or at is None or now - at > BASE_WINDOW:
            continue
        i = pos[base]
        why.setdefault(snapshots[i]["name"], f"the common base of {uri}")
        for s in snapshots[i + 1:]:
            if s.get("flags", 0) & FLAG_REPLICATE:
                why.setdefault(s["name"], f"not yet replicated to {uri}")
    return why


class Plan(NamedTuple):
    delete: list[str]  # oldest first
    kept: dict[str, str]  # beyond the policy but protected -> why
    retained: dict[str, str]  # kept by the policy -> which rule


def plan(snapshots: list[dict], keep: int, keep_safe: dict[str, str], *, only_tagged: bool = False,
         gfs: Mapping | None = None, tz: _dt.tzinfo | None = None) -> Plan:
    """The prune plan. Without gfs the policy is the newest `keep` of the pool (list order);
    with gfs ({"hourly": H, "daily": D, "weekly": W, "monthly": M}, gfs.py) it is those rules
    plus the newest `keep`. Counts only tagged snapshots when only_tagged (`--keep-local` leaves
    the user's own alone). A protected snapshot (keep_safe) is never in `delete`."""
    pool = [s for s in snapshots if not only_tagged or s.get("flags", 0) & FLAG_REPLICATE]
    if gfs is None:
        n = max(0, len(pool) - keep)
        retained = {s["name"]: f"newest {keep}" for s in pool[n:]}
    else:
        retained = gfs_keep(pool, latest=keep, tz=tz, **(check_counts(gfs) or {}))
    beyond = [s["name"] for s in pool if s["name"] not in retained]
    return Plan([n for n in beyond if n not in keep_safe], {n: keep_safe[n] for n in beyond if n in keep_safe},
                retained)


def prune_plan(snapshots: list[dict], keep: int, keep_safe: dict[str, str], *,
               only_tagged: bool = False, gfs: Mapping | None = None,
               tz: _dt.tzinfo | None = None) -> tuple[list[str], dict[str, str]]:
    """(names to delete oldest first, names kept although beyond the policy -> why): plan()."""
    p = plan(snapshots, keep, keep_safe, only_tagged=only_tagged, gfs=gfs, tz=tz)
    return p.delete, p.kept


class Rules(NamedTuple):
    """A retention policy: the newest `latest` plus GFS counts (all zero: no rule)."""

    latest: int = 0
    gfs: Mapping | None = None

    def any(self) -> bool:
        return bool(self.latest) or self.has_gfs()

    def has_gfs(self) -> bool:
        return any((self.gfs or {}).values())

    def covers(self, other: Rules) -> bool:
        """True when every snapshot `other` keeps, this keeps too (each count at least as high)."""
        mine, theirs = self.gfs or {}, other.gfs or {}
        return self.latest >= other.latest and all(mine.get(p, 0) >= n for p, n in theirs.items())

    def __str__(self) -> str:
        return describe(self.latest, self.gfs)


def dr_plan(snapshots: list[dict], committed_at: Mapping[str, str], own: Rules, request: Rules | None,
            min_age: _dt.timedelta, now: _dt.datetime, tz: _dt.tzinfo | None = None) -> tuple[list[dict], dict]:
    """The DR's retention (REPLICATION.md §4): (snapshots to delete, name -> why kept).

    Candidates are only snapshots a transfer committed (flag FLAG_DR); their time is the DR's own
    commit clock (committed_at by uuid, else `created`). Every one younger than min_age is kept;
    of the older ones, those the DR's own rules keep, plus those an honoured remote request
    keeps (a request adds to the DR's rules, never removes from them), plus always the newest
    older one. No rule and no request: nothing is deleted."""
    if not own.any() and request is None:
        return [], {}
    cutoff = now - min_age
    old, why = [], {}
    for s in snapshots:
        if not s.get("flags", 0) & FLAG_DR:
            continue
        at = parse_time(committed_at.get(s["uuid"]) or s.get("created"))
        if at is None or at > cutoff:
            why[s["name"]] = (f"younger than --keep-min-age ({int(min_age.total_seconds())} s)" if at
                              else "commit time unreadable")
        else:
            old.append({"name": s["name"], "created": at.isoformat(), "snap": s})
    for rules in (own, request):
        if rules is not None and rules.any():
            for name, r in gfs_keep(old, latest=rules.latest, tz=tz, **(check_counts(rules.gfs) or {})).items():
                why[name] = why[name] + "; " + r if name in why else r
    if old:
        why.setdefault(old[-1]["name"], "the newest older than the minimum age")
    return [o["snap"] for o in old if o["name"] not in why], why
