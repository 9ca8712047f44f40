"""GFS retention on both sites with real servers (issue 9; docs/REPLICATION.md §4, §6).

    primary: `blockrep snapshot prune VOL --keep N --keep-daily D …` (served and not)
    DR:      `blockrep serve DRVOL --keep-daily D --keep-monthly M …`, and a primary's
             `replicate --keep-remote-daily D …` request at commit

How time is made to pass, with nothing in the engine that only tests use:
- primary snapshots are created with the engine's own API (Volume.snapshot_create takes the
  creation time) on the unserved volume, before the CLI prunes them;
- DR snapshots are committed by real transfers, then the DR is stopped and its own record of the
  commit times (DRVOL/dr.json `committed_at`, the clock its retention reads) is moved back, as
  if those transfers had happened weeks ago; the next commit then applies the rules to that past.
- TZ=UTC in the environment of the CLI and the servers (the rules use local time).
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import run_blockrep
from replhelp import assert_one_error_line, replicate, write_blocks

from engine.replication import drclient
from engine.volume import Volume

UTC = dt.UTC
KiB = 1 << 10


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")


def names(vol) -> list[str]:
    return [s["name"] for s in json.loads(run_blockrep("snapshot", "list", vol, "--json", check=True).stdout)]


def make_history(vol, days: list[dt.datetime]) -> list[str]:
    """User snapshots with these creation times, made on the unserved volume with the engine's API."""
    out = []
    with Volume.open(vol) as v:
        for t in days:
            name = f"d{t:%Y-%m-%dT%H}"
            v.snapshot_create(name, created_ns=int(t.timestamp()) * 10**9)
            out.append(name)
    return out


# ------------------------------------------------------------------ the primary

@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_snapshot_prune_keeps_the_gfs_rules_and_the_newest_n(make_server, served):
    s = make_server("prim", size="4M", start=False)
    days = [dt.datetime(2026, 6, 1, 12, tzinfo=UTC) + dt.timedelta(days=i) for i in range(70)]  # .. Sun 2026-08-09
    made = make_history(s.vol, days)
    if served:
        s.start()
    r = run_blockrep("snapshot", "prune", s.vol, "--keep", "2", "--keep-weekly", "3", "--keep-monthly", "2",
                     check=True)
    # newest 2: Aug 9, 8; weekly: Aug 9, Aug 2, Jul 26 (Sundays); monthly: Aug 9, Jul 31
    left = ["d2026-07-26T12", "d2026-07-31T12", "d2026-08-02T12", "d2026-08-08T12", "d2026-08-09T12"]
    assert names(s.vol) == left
    assert r.stdout.splitlines() == [f"deleted {n}" for n in made if n not in left]
    assert r.stderr == ""
    r = run_blockrep("snapshot", "prune", s.vol, "--keep", "2", "--keep-weekly", "3", "--keep-monthly", "2",
                     check=True)
    assert r.stdout == "" and names(s.vol) == left  # the same rules again: nothing more to delete
    r = run_blockrep("snapshot", "prune", s.vol, "--keep-daily", "1", check=True)  # GFS alone: no --keep
    assert names(s.vol) == ["d2026-08-09T12"] and len(r.stdout.splitlines()) == 4


def test_prune_flags_are_checked_before_anything_changes(make_server):
    s = make_server("prim", size="4M", start=False)
    make_history(s.vol, [dt.datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2, 3)])
    before = names(s.vol)
    for bad in (["--keep-daily", "-1"], ["--keep", "1", "--keep-monthly", "-2"], []):
        line = assert_one_error_line(run_blockrep("snapshot", "prune", s.vol, *bad))
        assert ("--keep-" in line and "0 or more" in line) if bad else "say what to keep" in line
    r = run_blockrep("snapshot", "prune", s.vol, "--keep-weekly", "many")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("blockrep: error:")
    assert names(s.vol) == before
    # --keep alone is what it always was: the newest N in list order
    r = run_blockrep("snapshot", "prune", s.vol, "--keep", "1", check=True)
    assert r.stdout.splitlines() == ["deleted d2026-01-01T00", "deleted d2026-01-02T00"]


def test_gfs_prune_keeps_what_replication_needs_unless_forced(make_server):
    p = make_server("prim", size="8M")
    d = make_server("dr", size="8M")
    write_blocks(p.uri, {0: b"\x11" * 4096})
    base = replicate(p.vol, d.uri)["snapshot"]
    run_blockrep("snapshot", "create", p.vol, "--name", "later", check=True)  # the same day, newer
    r = run_blockrep("snapshot", "prune", p.vol, "--keep-daily", "1", check=True)
    assert names(p.vol) == [base, "later"] and r.stdout == ""
    assert r.stderr.strip() == f"blockrep: kept {base}: the common base of {d.uri} (--force deletes it)"
    r = run_blockrep("snapshot", "prune", p.vol, "--keep-daily", "1", "--force", check=True)
    assert names(p.vol) == ["later"] and r.stdout.splitlines() == [f"deleted {base}"]


# ------------------------------------------------------------------ the DR

def months_ago(n: int, day: int, hour: int) -> dt.datetime:
    now = dt.datetime.now(UTC)
    y, m = divmod(now.year * 12 + now.month - 1 - n, 12)
    return dt.datetime(y, m + 1, day, hour, tzinfo=UTC)


# three commits on one day three months ago, then one on each of two days last month
PAST = [months_ago(3, 15, 9), months_ago(3, 15, 12), months_ago(3, 15, 15), months_ago(1, 10, 12),
        months_ago(1, 11, 12)]


def dr_with_past(make_server, p, name: str, serve_args: tuple) -> tuple:
    """A DR with five snapshots committed by real transfers, their commit times moved back to
    PAST while it was stopped, then served with serve_args. Returns (DR, the five names)."""
    d = make_server(name, size="8M", serve_args=("--keep-min-age", "1h"))
    made = []
    for i in range(len(PAST)):
        write_blocks(p.uri, {i * 64 * KiB: bytes([i + 1]) * 4096})
        made.append(replicate(p.vol, d.uri)["snapshot"])
    d.stop()
    path = d.vol / "dr.json"
    st = json.loads(path.read_text())
    when = dict(zip(made, PAST, strict=True))
    for rec in st["snapshots"].values():
        rec["committed_at"] = when[rec["name"]].isoformat().replace("+00:00", "Z")
    path.write_text(json.dumps(st, indent=2) + "\n")
    d.serve_args = serve_args
    d.start()
    return d, made


def dr_names(d) -> list[str]:
    return names(d.vol)


def test_the_drs_own_gfs_rules_prune_its_past_but_never_the_recent(make_server):
    p = make_server("prim", size="8M")
    d, made = dr_with_past(make_server, p, "dr", ("--keep-daily", "1", "--keep-monthly", "2", "--keep-min-age", "1h"))
    assert drclient.hello(d.uri)["retention"]["gfs"] == {"hourly": 0, "daily": 1, "weekly": 0, "monthly": 2}
    write_blocks(p.uri, {1 << 20: b"\x77" * 4096})
    r = replicate(p.vol, d.uri)
    # daily 1: the newest older than an hour (last month's 11th); monthly 2: it and the 15:00 of 3 months ago
    assert r["pruned_remote"] == [made[0], made[1], made[3]]
    assert dr_names(d) == [made[2], made[4], r["snapshot"]]  # the new one is younger than --keep-min-age
    log = (d.vol / "server.log").read_text()
    assert f"retention (--keep-daily 1 --keep-monthly 2, min age 3600 s) deleted snapshot {made[3]}" in log
    # the next commit finds nothing more to prune
    write_blocks(p.uri, {2 << 20: b"\x78" * 4096})
    r2 = replicate(p.vol, d.uri)
    assert r2["pruned_remote"] == [] and dr_names(d) == [made[2], made[4], r["snapshot"], r2["snapshot"]]


def test_a_primarys_gfs_request_adds_to_the_drs_rules_and_never_removes_from_them(make_server):
    p = make_server("prim", size="8M")
    d, made = dr_with_past(make_server, p, "dr", ("--keep-monthly", "2", "--keep-min-age", "1h",
                                                  "--allow-remote-prune"))
    write_blocks(p.uri, {1 << 20: b"\x77" * 4096})
    r = replicate(p.vol, d.uri, "--keep-remote", "1", "--keep-remote-daily", "2")
    # the DR's monthly 2 keeps made[4] and made[2]; the request adds made[3] (its daily 2)
    assert r["pruned_remote"] == [made[0], made[1]]
    assert dr_names(d) == [made[2], made[3], made[4], r["snapshot"]]
    assert r["keep_remote"] == "honoured together with the DR's own --keep-monthly 2 (a request never keeps less)"
    assert "asked --keep 1 --keep-daily 2" in (d.vol / "server.log").read_text()


def test_a_gfs_request_is_ignored_without_allow_remote_prune(make_server):
    p = make_server("prim", size="8M")
    d, made = dr_with_past(make_server, p, "dr", ("--keep-min-age", "1h"))
    r = replicate(p.vol, d.uri, "--keep-remote-daily", "1")
    assert r["pruned_remote"] == [] and dr_names(d) == [*made, r["snapshot"]]
    assert r["keep_remote"].startswith("ignored")
    assert "ignored a request to keep --keep-daily 1" in (d.vol / "server.log").read_text()


def test_serve_and_replicate_refuse_negative_gfs_counts(make_server):
    s = make_server("vol", size="4M", start=False)
    line = assert_one_error_line(run_blockrep("serve", s.vol, "--keep-weekly", "-1"))
    assert "--keep-weekly" in line and not s.running
    line = assert_one_error_line(run_blockrep("replicate", s.vol, "--to", "nbd+unix:///?socket=/nonexistent",
                                              "--keep-remote-monthly", "-3"))
    assert "--keep-remote-monthly" in line
