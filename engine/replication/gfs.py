"""Grandfather-father-son retention (docs/REPLICATION.md §6): which snapshots a `--keep-hourly H
--keep-daily D --keep-weekly W --keep-monthly M` policy keeps. Pure: a snapshot list in, names and
reasons out; the clock and the time zone are arguments, so tests fix both.

Notes on the design:
- A period rule with count N keeps the newest snapshot of each of the N most recent buckets (hour,
  day, ISO week, month) **that hold a snapshot**. Empty buckets do not count (sanoid keeps N
  snapshots per period, borg and restic say "days without backups do not count"), so an outage of
  a week does not age the older history out: `--keep-daily 7` still keeps 7 daily snapshots.
- `latest` N keeps the newest N snapshots outright (the plain `--keep` count).
- The rules are independent: one snapshot can be the daily, the weekly and the monthly one; a
  snapshot kept by any rule is kept, and its reason names every rule that keeps it.
- Buckets are in local time (the host's, or `tz`): a day is the local calendar day (23 or 25
  hours on DST change days). An hour is a real hour: the key carries the UTC offset, so the
  repeated 02:00 hour of an autumn DST change is two buckets, not one.
- Order: snapshots are ordered by `created` (a stable sort: equal times keep their list order,
  later in the list = newer), so the result depends on the input order only between snapshots
  created in the same second.
- A snapshot whose `created` cannot be read is always kept (never delete what cannot be placed).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping

from ..errors import InvalidArgument

PERIODS = ("hourly", "daily", "weekly", "monthly")
MAX_COUNT = 1 << 20  # far beyond any useful count; bounds what a request may carry


def parse_time(t: object) -> _dt.datetime | None:
    """An ISO 8601 time as an aware UTC datetime (naive = UTC), None if unreadable."""
    if not isinstance(t, str) or not t:
        return None
    try:
        d = _dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None
    return d.replace(tzinfo=_dt.UTC) if d.tzinfo is None else d.astimezone(_dt.UTC)


def check_counts(counts: Mapping | None, what: str = "keep") -> dict[str, int] | None:
    """The GFS counts as {period: n} with every period present, or None for None. Refuses
    (InvalidArgument) unknown periods and anything but integers 0..MAX_COUNT; None counts as 0."""
    if counts is None:
        return None
    if not isinstance(counts, Mapping):
        raise InvalidArgument(f"{what} GFS counts must be an object of {', '.join(PERIODS)}")
    bad = sorted(set(counts) - set(PERIODS), key=str)
    if bad:
        raise InvalidArgument(f"unknown {what} period {bad[0]!r} (expected {', '.join(PERIODS)})")
    out = {}
    for p in PERIODS:
        n = counts.get(p)
        n = 0 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNT:
            raise InvalidArgument(f"--{what}-{p} must be a whole number from 0 to {MAX_COUNT}, not {n!r}")
        out[p] = n
    return out


def _key(period: str, t: _dt.datetime) -> tuple:
    if period == "hourly":
        return (t.date(), t.hour, t.utcoffset())
    if period == "daily":
        return (t.date(),)
    if period == "weekly":
        return tuple(t.isocalendar()[:2])
    return (t.year, t.month)


def _label(period: str, t: _dt.datetime) -> str:
    if period == "hourly":
        return t.strftime("%Y-%m-%dT%H:00%z")
    if period == "daily":
        return t.strftime("%Y-%m-%d")
    if period == "weekly":
        y, w, _ = t.isocalendar()
        return f"{y}-W{w:02d}"
    return t.strftime("%Y-%m")


def gfs_keep(snapshots: list[dict], *, latest: int = 0, hourly: int = 0, daily: int = 0, weekly: int = 0,
             monthly: int = 0, tz: _dt.tzinfo | None = None) -> dict[str, str]:
    """name -> why it is kept, e.g. "newest 3, daily 2026-03-01, weekly 2026-W09". snapshots:
    oldest first, each with `name` and `created` (ISO 8601, as `snapshot list --json` gives).
    tz: the zone of the buckets (default: this host's local time)."""
    counts = check_counts({"hourly": hourly, "daily": daily, "weekly": weekly, "monthly": monthly})
    assert counts is not None
    if isinstance(latest, bool) or not isinstance(latest, int) or not 0 <= latest <= MAX_COUNT:
        raise InvalidArgument(f"--keep must be a whole number from 0 to {MAX_COUNT}, not {latest!r}")
    local: Callable[[_dt.datetime], _dt.datetime] = (lambda d: d.astimezone(tz)) if tz else (lambda d: d.astimezone())
    why: dict[str, list[str]] = {}
    timed = []
    for i, s in enumerate(snapshots):
        t = parse_time(s.get("created"))
        if t is None:
            why.setdefault(s["name"], []).append("created time unreadable")
        else:
            timed.append((t, i, s["name"]))
    newest_first = [(local(t), name) for t, _, name in sorted(timed, reverse=True)]
    for _, name in newest_first[:latest]:
        why.setdefault(name, []).append(f"newest {latest}")
    for period in PERIODS:
        n, seen = counts[period], set[tuple]()
        for t, name in newest_first:
            if len(seen) >= n:
                break
            k = _key(period, t)
            if k not in seen:  # the newest snapshot of a bucket not counted yet
                seen.add(k)
                why.setdefault(name, []).append(f"{period} {_label(period, t)}")
    return {name: ", ".join(r) for name, r in why.items()}


def describe(latest: int | None, counts: Mapping | None) -> str:
    """The rules as the flags that set them ("--keep 3 --keep-daily 7"), for notes and logs."""
    parts = [f"--keep {latest}"] if latest else []
    parts += [f"--keep-{p} {counts[p]}" for p in PERIODS if counts and counts.get(p)]
    return " ".join(parts) or "no rule"
