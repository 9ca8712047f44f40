"""Which snapshots may be pruned (docs/REPLICATION.md §6). Pure functions over snapshot lists and
replication records, unit-tested without servers (tests/test_retention.py).

Kept unless forced: the newest common base of every target that replicated successfully within
BASE_WINDOW, every snapshot `replicate` made (flag FLAG_REPLICATE) that is newer than such a
base (that target has not received it yet; zrepl calls these keep-not-replicated), and the
snapshot a run is shipping (or an interrupted run will resume).
"""

from __future__ import annotations

import datetime as _dt

FLAG_REPLICATE = 1  # snapshot flag bit 0: created by `replicate` (or the scheduler)
BASE_WINDOW = _dt.timedelta(days=30)


def _parse(t: str | None) -> _dt.datetime | None:
    if not t:
        return None
    try:
        return _dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None


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
        at = _parse(t.get("replicated_at"))
        base = t.get("snapshot_uuid")
        if base not in pos or at is None or now - at > BASE_WINDOW:
            continue
        i = pos[base]
        why.setdefault(snapshots[i]["name"], f"the common base of {uri}")
        for s in snapshots[i + 1:]:
            if s.get("flags", 0) & FLAG_REPLICATE:
                why.setdefault(s["name"], f"not yet replicated to {uri}")
    return why


def prune_plan(snapshots: list[dict], keep: int, keep_safe: dict[str, str], *,
               only_tagged: bool = False) -> tuple[list[str], dict[str, str]]:
    """(names to delete oldest first, names kept although beyond `keep` -> why). Counts only
    tagged snapshots when only_tagged (`--keep-local` leaves the user's own alone)."""
    pool = [s for s in snapshots if not only_tagged or s.get("flags", 0) & FLAG_REPLICATE]
    beyond = pool[: max(0, len(pool) - keep)]
    doomed = [s["name"] for s in beyond if s["name"] not in keep_safe]
    kept = {s["name"]: keep_safe[s["name"]] for s in beyond if s["name"] in keep_safe}
    return doomed, kept
