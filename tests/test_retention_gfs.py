"""GFS retention, the pure parts (issue 9; docs/REPLICATION.md §4, §6): which snapshots
`--keep-hourly/--keep-daily/--keep-weekly/--keep-monthly` keep, how that combines with the
protection replication needs on the primary and with the DR's own rules and a primary's request
on the DR, and the commit's optional `gfs=` argument. Fixed clocks and fixed time zones only.
"""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidArgument
from engine.replication import drclient, retention
from engine.replication import protocol as P
from engine.replication.gfs import PERIODS, check_counts, gfs_keep

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
TOKEN = "0123456789abcdef" * 2


def iso(t: dt.datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def at(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def series(start: dt.datetime, n: int, step: dt.timedelta, prefix: str = "s", flags: int = 1) -> list[dict]:
    """n snapshots, oldest first, `step` apart, named by their UTC time (s2026-03-01T12)."""
    out = []
    for i in range(n):
        t = start + i * step
        out.append({"name": f"{prefix}{t.astimezone(UTC):%Y-%m-%dT%H%M}", "created": iso(t), "flags": flags,
                    "uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{prefix}{i}"))})
    return out


def name(t: dt.datetime, prefix: str = "s") -> str:
    return f"{prefix}{t.astimezone(UTC):%Y-%m-%dT%H%M}"


# ------------------------------------------------------------------ the rules, by example

def test_hourly_snapshots_over_90_days_daily_7_weekly_4_monthly_3():
    """2026-01-01 .. 2026-03-31 every hour (UTC buckets). 2026-03-31 is a Tuesday of ISO week 14."""
    snaps = series(at(2026, 1, 1), 90 * 24, dt.timedelta(hours=1))
    kept = gfs_keep(snaps, daily=7, weekly=4, monthly=3, tz=UTC)
    last = [at(2026, 3, d, 23) for d in range(25, 32)]  # the newest of each of the last 7 days
    sundays = [at(2026, 3, 15, 23), at(2026, 3, 22, 23)]  # weeks 11, 12 end on Sunday; 13 and 14 are in `last`
    months = [at(2026, 1, 31, 23), at(2026, 2, 28, 23)]  # March's newest is in `last`
    assert set(kept) == {name(t) for t in last + sundays + months}
    assert kept[name(at(2026, 3, 31, 23))] == "daily 2026-03-31, weekly 2026-W14, monthly 2026-03"
    assert kept[name(at(2026, 3, 29, 23))] == "daily 2026-03-29, weekly 2026-W13"
    assert kept[name(at(2026, 1, 31, 23))] == "monthly 2026-01"


def test_latest_is_the_plain_count_and_rules_add_up():
    snaps = series(at(2026, 5, 1, 12), 10, dt.timedelta(days=1))
    assert set(gfs_keep(snaps, latest=3, tz=UTC)) == {s["name"] for s in snaps[-3:]}
    kept = gfs_keep(snaps, latest=2, weekly=3, tz=UTC)  # 2026-05-01 is a Friday: only weeks 18 and 19
    assert set(kept) == {name(at(2026, 5, 10, 12)), name(at(2026, 5, 9, 12)), name(at(2026, 5, 3, 12))}
    assert kept[snaps[-1]["name"]] == "newest 2, weekly 2026-W19"
    assert gfs_keep(snaps, tz=UTC) == {} and gfs_keep([], latest=3, daily=2, tz=UTC) == {}


def test_periods_without_a_snapshot_do_not_count():
    """sanoid / borg / restic: an outage does not age the history out."""
    days = [at(2026, 1, 1, 12), at(2026, 1, 2, 12), at(2026, 1, 20, 12), at(2026, 2, 15, 12)]
    snaps = [{"name": name(t), "created": iso(t)} for t in days]
    assert set(gfs_keep(snaps, daily=3, tz=UTC)) == {name(t) for t in days[1:]}
    assert set(gfs_keep(snaps, monthly=5, tz=UTC)) == {name(days[2]), name(days[3])}


def test_the_newest_snapshot_of_a_bucket_is_the_one_kept():
    snaps = series(at(2026, 7, 1, 0, 5), 6, dt.timedelta(minutes=10))  # 00:05 .. 00:55, one hour
    assert gfs_keep(snaps, hourly=5, tz=UTC) == {name(at(2026, 7, 1, 0, 55)): "hourly 2026-07-01T00:00+0000"}


def test_iso_weeks_cross_the_year_and_months_do_not():
    """2026 has 53 ISO weeks: 2026-12-28 .. 2027-01-03 is week 2026-W53."""
    snaps = series(at(2026, 12, 25, 12), 17, dt.timedelta(days=1))  # .. 2027-01-10
    kept = gfs_keep(snaps, weekly=3, monthly=2, tz=UTC)
    assert kept == {name(at(2026, 12, 27, 12)): "weekly 2026-W52", name(at(2026, 12, 31, 12)): "monthly 2026-12",
                    name(at(2027, 1, 3, 12)): "weekly 2026-W53",
                    name(at(2027, 1, 10, 12)): "weekly 2027-W01, monthly 2027-01"}


def test_buckets_are_local_time():
    """23:30 UTC on 2026-06-30 is 01:30 on 2026-07-01 in Berlin (CEST, +2)."""
    snaps = [{"name": "june", "created": "2026-06-30T20:00:00Z"}, {"name": "late", "created": "2026-06-30T23:30:00Z"}]
    assert set(gfs_keep(snaps, monthly=1, tz=UTC)) == {"late"}
    assert gfs_keep(snaps, monthly=2, tz=BERLIN) == {"june": "monthly 2026-06", "late": "monthly 2026-07"}
    assert set(gfs_keep(snaps, daily=1, tz=BERLIN)) == {"late"}


def test_the_default_zone_is_this_hosts_local_time(monkeypatch):
    snaps = [{"name": "june", "created": "2026-06-30T20:00:00Z"}, {"name": "late", "created": "2026-06-30T23:30:00Z"}]
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert gfs_keep(snaps, monthly=2) == gfs_keep(snaps, monthly=2, tz=BERLIN) != gfs_keep(snaps, monthly=2, tz=UTC)
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
        assert gfs_keep(snaps, monthly=2) == {"late": "monthly 2026-06"}
    finally:
        monkeypatch.undo()
        time.tzset()


# ------------------------------------------------------------------ DST change days (Europe/Berlin)

def test_spring_forward_day_has_23_hours_and_one_daily_bucket():
    """2026-03-29: 02:00 CET jumps to 03:00 CEST. Hourly snapshots from 03-28 00:00 CET to 03-30 23:00 CEST."""
    snaps = series(at(2026, 3, 27, 23), 24 + 23 + 24, dt.timedelta(hours=1))
    assert snaps[-1]["created"] == "2026-03-30T21:00:00Z"
    on_29 = [s for s in snaps if s["created"].startswith("2026-03-28T23") or
             "2026-03-29T00" <= s["created"] < "2026-03-29T22"]
    assert len(on_29) == 23
    kept = gfs_keep(snaps, daily=3, tz=BERLIN)
    assert kept == {name(at(2026, 3, 28, 22)): "daily 2026-03-28", name(at(2026, 3, 29, 21)): "daily 2026-03-29",
                    name(at(2026, 3, 30, 21)): "daily 2026-03-30"}
    # every real hour is a bucket; the local hour 02:00 that does not exist is none
    kept = gfs_keep(snaps[:27], hourly=3, tz=BERLIN)  # .. 2026-03-29T01:00Z
    assert kept == {name(at(2026, 3, 28, 23)): "hourly 2026-03-29T00:00+0100",
                    name(at(2026, 3, 29, 0)): "hourly 2026-03-29T01:00+0100",
                    name(at(2026, 3, 29, 1)): "hourly 2026-03-29T03:00+0200"}


def test_fall_back_the_repeated_hour_is_two_buckets():
    """2026-10-25: 03:00 CEST goes back to 02:00 CET, so 02:00-03:00 happens twice (00:00Z and 01:00Z)."""
    snaps = series(at(2026, 10, 24, 23), 8, dt.timedelta(minutes=30))  # 01:00 CEST .. 03:30 CET
    kept = gfs_keep(snaps, hourly=3, tz=BERLIN)
    assert kept == {name(at(2026, 10, 25, 0, 30)): "hourly 2026-10-25T02:00+0200",
                    name(at(2026, 10, 25, 1, 30)): "hourly 2026-10-25T02:00+0100",
                    name(at(2026, 10, 25, 2, 30)): "hourly 2026-10-25T03:00+0100"}


def test_fall_back_day_has_25_hourly_snapshots_in_one_daily_bucket():
    snaps = series(at(2026, 10, 24, 21), 26, dt.timedelta(hours=1))  # 10-24 23:00 CEST .. 10-25 23:00 CET
    assert sum(1 for s in snaps if s["created"] >= "2026-10-24T22") == 25
    kept = gfs_keep(snaps, daily=2, tz=BERLIN)
    assert kept == {name(at(2026, 10, 24, 21)): "daily 2026-10-24", name(at(2026, 10, 25, 22)): "daily 2026-10-25"}
    assert len(gfs_keep(snaps, hourly=30, tz=BERLIN)) == 26  # 26 real hours, 26 buckets


# ------------------------------------------------------------------ odd input

def test_a_snapshot_whose_time_cannot_be_read_is_kept():
    snaps = [{"name": "odd", "created": "yesterday"}, {"name": "none"},
             {"name": "a", "created": "2026-01-01T00:00:00Z"}, {"name": "b", "created": "2026-01-02T00:00:00Z"}]
    assert gfs_keep(snaps, latest=1, tz=UTC) == {"odd": "created time unreadable", "none": "created time unreadable",
                                                "b": "newest 1"}


def test_equal_times_the_later_in_the_list_is_the_newer():
    snaps = [{"name": "x", "created": "2026-01-01T00:00:00Z"}, {"name": "y", "created": "2026-01-01T00:00:00Z"}]
    assert set(gfs_keep(snaps, daily=1, tz=UTC)) == {"y"}
    assert set(gfs_keep(snaps[::-1], daily=1, tz=UTC)) == {"x"}


@pytest.mark.parametrize("counts", [{"daily": -1}, {"weekly": True}, {"monthly": 1.5}, {"yearly": 1},
                                    {"hourly": "3"}, {"daily": 1 << 21}])
def test_bad_counts_are_refused(counts):
    with pytest.raises(InvalidArgument):
        check_counts(counts)
    with pytest.raises(InvalidArgument):
        retention.plan([], 0, {}, gfs=counts)


@pytest.mark.parametrize("kw", [{"daily": -1}, {"latest": -1}, {"latest": True}, {"hourly": 2.0}])
def test_gfs_keep_refuses_bad_counts(kw):
    with pytest.raises(InvalidArgument):
        gfs_keep([{"name": "a", "created": "2026-01-01T00:00:00Z"}], tz=UTC, **kw)


def test_check_counts_fills_in_zeros_and_none():
    assert check_counts({"daily": 7, "hourly": None}) == {"hourly": 0, "daily": 7, "weekly": 0, "monthly": 0}
    assert check_counts(None) is None
    with pytest.raises(InvalidArgument, match="--keep-remote-daily"):
        check_counts({"daily": -1}, "keep-remote")


# ------------------------------------------------------------------ properties (hypothesis)

ZONES = [UTC, BERLIN, ZoneInfo("America/New_York"), ZoneInfo("Australia/Lord_Howe"), ZoneInfo("Asia/Kathmandu")]
T0 = at(2026, 1, 1)


def reference(snaps, latest, counts, tz) -> set[str]:
    """The rules written another way: group by bucket, keep each group's newest, take the N
    groups with the newest snapshots."""
    timed = sorted((dt.datetime.fromisoformat(s["created"].replace("Z", "+00:00")), i, s["name"])
                   for i, s in enumerate(snaps))
    keep = {n for *_, n in timed[max(0, len(timed) - latest):]} if latest else set()
    keys = {"hourly": lambda t: (t.strftime("%Y-%m-%d %H"), t.strftime("%z")), "daily": lambda t: t.date(),
            "weekly": lambda t: t.date() - dt.timedelta(days=t.weekday()), "monthly": lambda t: (t.year, t.month)}
    for period, n in counts.items():
        groups: dict = {}
        for t, i, nm in timed:
            groups[keys[period](t.astimezone(tz))] = (t, i, nm)  # later wins: the newest of the group
        keep |= {nm for *_, nm in sorted(groups.values(), reverse=True)[:n]}
    return keep


history = st.lists(st.integers(0, 400 * 86400), min_size=0, max_size=60, unique=True).map(
    lambda secs: [{"name": f"n{s}", "created": iso(T0 + dt.timedelta(seconds=s)), "flags": s % 2,
                   "uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, str(s)))} for s in sorted(secs)])
count = st.integers(0, 6)
rules = st.fixed_dictionaries({p: count for p in PERIODS})


@settings(max_examples=300, deadline=None)
@given(snaps=history, latest=count, counts=rules, tz=st.sampled_from(ZONES), seed=st.integers())
def test_gfs_matches_the_reference_and_ignores_input_order(snaps, latest, counts, tz, seed):
    kept = gfs_keep(snaps, latest=latest, tz=tz, **counts)
    assert set(kept) == reference(snaps, latest, counts, tz)
    shuffled = snaps[:]
    random.Random(seed).shuffle(shuffled)  # times are distinct: the list order must not matter
    assert gfs_keep(shuffled, latest=latest, tz=tz, **counts) == kept
    assert len(kept) <= latest + sum(counts.values())
    if snaps and (latest or any(counts.values())):
        assert snaps[-1]["name"] in kept  # the newest is the newest of every bucket it is in
    for why in kept.values():  # every reason names a rule that is on
        for part in why.split(", "):
            rule = part.split(" ")[0]
            assert (rule == "newest" and latest) or counts.get(rule)


@settings(max_examples=200, deadline=None)
@given(snaps=history, latest=count, counts=rules, tz=st.sampled_from(ZONES), period=st.sampled_from(PERIODS))
def test_a_higher_count_never_keeps_less(snaps, latest, counts, tz, period):
    kept = set(gfs_keep(snaps, latest=latest, tz=tz, **counts))
    more = dict(counts, **{period: counts[period] + 1})
    assert kept <= set(gfs_keep(snaps, latest=latest, tz=tz, **more))
    assert kept <= set(gfs_keep(snaps, latest=latest + 1, tz=tz, **counts))


@settings(max_examples=200, deadline=None)
@given(snaps=history, keep=count, counts=st.one_of(st.none(), rules), base=st.integers(-1, 59),
       only=st.booleans(), tz=st.sampled_from(ZONES))
def test_the_prune_plan_never_deletes_a_protected_snapshot(snaps, keep, counts, base, only, tz):
    now = T0 + dt.timedelta(days=401)
    tg = {"dr": {"snapshot_uuid": snaps[base]["uuid"], "replicated_at": iso(now)}} if 0 <= base < len(snaps) else {}
    safe = retention.protected(snaps, tg, now)
    p = retention.plan(snaps, keep, safe, only_tagged=only, gfs=counts, tz=tz)
    pool = [s["name"] for s in snaps if not only or s["flags"] & 1]
    assert not set(p.delete) & set(safe)
    assert not set(p.delete) & set(p.retained)
    assert set(p.delete) | set(p.kept) | set(p.retained) == set(pool)
    assert p.delete == [n for n in pool if n in p.delete]  # oldest first
    assert all(p.kept[n] == safe[n] for n in p.kept)
    if counts is None:  # the count alone: exactly what prune_plan did before GFS
        beyond = pool[: max(0, len(pool) - keep)]
        assert p.delete == [n for n in beyond if n not in safe]
    assert retention.prune_plan(snaps, keep, safe, only_tagged=only, gfs=counts, tz=tz) == (p.delete, p.kept)


def test_the_plan_reports_protected_snapshots_beyond_the_policy_with_the_reason():
    snaps = series(at(2026, 3, 1, 12), 5, dt.timedelta(days=1))
    safe = {snaps[0]["name"]: "the common base of nbd://dr/"}
    p = retention.plan(snaps, 1, safe, gfs={"daily": 2}, tz=UTC)
    assert p.delete == [snaps[1]["name"], snaps[2]["name"]]
    assert p.kept == {snaps[0]["name"]: "the common base of nbd://dr/"}
    assert p.retained == {snaps[3]["name"]: "daily 2026-03-04", snaps[4]["name"]: "newest 1, daily 2026-03-05"}
    assert retention.plan(snaps, 1, {}, gfs={"daily": 2}, tz=UTC).delete == [s["name"] for s in snaps[:3]]


# ------------------------------------------------------------------ the DR's plan

NOW = at(2026, 12, 1, 12)
HOUR = dt.timedelta(hours=1)


def dr_snaps(times: list[dt.datetime], flags: int = 2) -> tuple[list[dict], dict[str, str]]:
    snaps = [{"name": name(t, "d"), "uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, iso(t))), "flags": flags,
              "created": iso(NOW)} for t in times]  # `created` is overridden by the commit clock
    return snaps, {s["uuid"]: iso(t) for s, t in zip(snaps, times, strict=True)}


def dr_delete(snaps, committed, own, request=None, min_age=HOUR) -> list[str]:
    doomed, _ = retention.dr_plan(snaps, committed, own, request, min_age, NOW, tz=UTC)
    return [s["name"] for s in doomed]


def test_dr_gfs_counts_only_committed_snapshots_older_than_the_minimum_age():
    days = [NOW - dt.timedelta(days=d) for d in (40, 39, 10, 9, 2)] + [NOW - dt.timedelta(minutes=m) for m in (50, 5)]
    snaps, committed = dr_snaps(days)
    own = retention.Rules(0, {"daily": 2, "monthly": 2})
    # old: -40 (Oct 22), -39 (Oct 23), -10 (Nov 21), -9 (Nov 22), -2 (Nov 29): daily keeps Nov 29 and 22,
    # monthly Nov 29 and Oct 23; the two younger than an hour stay
    assert dr_delete(snaps, committed, own) == [name(days[0], "d"), name(days[2], "d")]
    admin = [{"name": "admin", "uuid": str(uuid.uuid4()), "flags": 0, "created": iso(NOW - dt.timedelta(days=99))}]
    assert dr_delete(admin + snaps, committed, own) == dr_delete(snaps, committed, own)
    assert dr_delete(snaps, committed, retention.Rules()) == []  # no rule: nothing is pruned


def test_a_remote_request_only_adds_to_what_the_drs_rules_keep():
    days = [NOW - dt.timedelta(days=d) for d in range(20, 0, -1)]
    snaps, committed = dr_snaps(days)
    own = retention.Rules(0, {"weekly": 2})
    mine = set(dr_delete(snaps, committed, own))
    for req in (retention.Rules(1), retention.Rules(0, {"daily": 3}), retention.Rules(5, {"monthly": 1})):
        assert set(dr_delete(snaps, committed, own, req)) <= mine
    # weekly 2: Nov 30 (W49), Nov 29 (W48); daily 3 adds Nov 28
    assert set(dr_delete(snaps, committed, own, retention.Rules(0, {"daily": 3}))) == mine - {name(days[-3], "d")}
    # a DR without rules of its own prunes to the request (never below one snapshot)
    assert dr_delete(snaps, committed, retention.Rules(), retention.Rules(2)) == [name(t, "d") for t in days[:-2]]
    assert dr_delete(snaps, committed, retention.Rules(), retention.Rules(0, {"hourly": 0})) == \
        [name(t, "d") for t in days[:-1]]


@settings(max_examples=200, deadline=None)
@given(secs=st.lists(st.integers(0, 90 * 1440).map(lambda m: m * 60), max_size=40, unique=True), own=count,
       req=st.none() | count,
       min_age=st.integers(0, 10 * 86400))
def test_dr_count_rules_behave_as_before_gfs(secs, own, req, min_age):
    """Count-only (old primaries, old flags): of the older ones the newest max(request, --keep or 1)."""
    times = sorted(NOW - dt.timedelta(seconds=s) for s in secs)
    snaps, committed = dr_snaps(times)
    got = dr_delete(snaps, committed, retention.Rules(own), None if req is None else retention.Rules(req),
                    dt.timedelta(seconds=min_age))
    old = [name(t, "d") for t in times if t <= NOW - dt.timedelta(seconds=min_age)]
    keep = own if req is None else max(req, own or 1)
    assert got == (old[: max(0, len(old) - max(keep, 1))] if keep or req is not None else [])


def test_dr_rules_describe_themselves_as_flags_and_cover():
    assert str(retention.Rules(3, {"daily": 7, "weekly": 0})) == "--keep 3 --keep-daily 7"
    assert retention.Rules(3, {"daily": 7}).covers(retention.Rules(2, {"daily": 7}))
    assert not retention.Rules(3).covers(retention.Rules(0, {"monthly": 1}))


# ------------------------------------------------------------------ the commit's gfs= argument

def test_a_commit_without_gfs_is_exactly_what_protocol_1_sent():
    old = f"!commit?token={TOKEN}&entries=3&shift=16&keep=2"
    assert P.build("commit", token=TOKEN, entries=3, shift=16, keep=2) == old
    assert P.build("commit", token=TOKEN, entries=3, shift=16, keep=2, gfs=None) == old
    assert P.build("commit", token=TOKEN, entries=3, shift=16, keep=2, gfs={"daily": 0}) == old
    assert "gfs" not in P.parse(old).args


def test_a_commit_with_gfs_round_trips():
    name_ = P.build("commit", token=TOKEN, entries=0, shift=20, keep=None, gfs={"monthly": 12, "daily": 7})
    assert name_.endswith("&keep=none&gfs=daily:7,monthly:12")
    assert P.parse(name_).args["gfs"] == {"hourly": 0, "daily": 7, "weekly": 0, "monthly": 12}
    assert P.parse(f"!commit?gfs=weekly:4&token={TOKEN}&entries=0&shift=20&keep=1").args["gfs"]["weekly"] == 4


@pytest.mark.parametrize("gfs", ["", "daily", "daily:", "daily:0", "daily:1,daily:2", "yearly:1", "daily:-1",
                                 "daily:\u0661", "daily:1,", "daily:1;weekly:2", "Daily:1", "daily:99999999"])
def test_a_malformed_gfs_argument_is_refused(gfs):
    with pytest.raises(InvalidArgument):
        P.parse(f"!commit?token={TOKEN}&entries=0&shift=16&keep=none&gfs={gfs}")


def test_an_old_dr_would_refuse_gfs_so_the_primary_sends_it_only_when_announced(monkeypatch):
    """An old DR parses with protocol 1's table: gfs= is an unknown argument there. The
    primary's Session sends it only when the DR's begin reply announces keep_gfs."""
    monkeypatch.setattr(P, "OPTIONAL", {})
    monkeypatch.setitem(P.ARGS, "commit", {k: v for k, v in P.ARGS["commit"].items() if k != "gfs"})
    with pytest.raises(InvalidArgument):
        P.parse(f"!commit?token={TOKEN}&entries=0&shift=16&keep=none&gfs=daily:7")
    monkeypatch.undo()
    sent: list[str] = []
    monkeypatch.setattr(drclient, "_json", lambda uri, export: sent.append(export) or {"keep_request": "none"})
    s = object.__new__(drclient.Session)
    s.uri, s.token = "nbd+unix:///?socket=/nowhere", TOKEN
    s.reply = {"resumed": False}  # an old DR: no "features"
    res = s.commit(0, 16, 2, {"daily": 7})
    assert sent[-1] == f"!commit?token={TOKEN}&entries=0&shift=16&keep=2"
    assert "GFS counts not sent" in res["keep_request"]
    s.reply = {"features": ["keep_gfs"]}
    res = s.commit(0, 16, 2, {"daily": 7})
    assert sent[-1].endswith("&keep=2&gfs=daily:7") and res["keep_request"] == "none"
    s.commit(0, 16, None, None)
    assert sent[-1].endswith("&keep=none")
