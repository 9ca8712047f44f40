"""Pure replication logic, without servers: the plan by identity (a table, as zrepl tests its
IncrementalPath), retention rules, the DR protocol's strict export-name grammar, resume points.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidArgument
from engine.replication import checksums as C
from engine.replication import plan, retention
from engine.replication import protocol as P

ME, OTHER, DRV = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


def snaps(*names, tagged=True):
    return [{"name": n, "uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, n)), "flags": 1 if tagged else 0,
             "created": "2026-12-01T00:00:00Z"} for n in names]


def hello(held=(), bound=ME, has_data=True, volume=DRV, transfer=None):
    return {"volume": volume, "bound_to": bound, "has_data": has_data, "transfer": transfer,
            "snapshots": [{"name": s["name"], "uuid": s["uuid"]} for s in held]}


# ------------------------------------------------------------------ plan for a blockrep DR

def test_a_cleanly_paused_seed_the_dr_still_holds_resumes_as_a_seed_not_a_rebase():
    s = snaps("a", "b")
    prog = {"mode": "seed", "snapshot_uuid": s[1]["uuid"], "done_upto": 4096, "clean": True}
    held = hello(held=[], transfer={"snapshot": s[1]["uuid"], "live": False})
    assert plan.for_blockrep(s, s[1], ME, held, progress=prog).mode == "seed"
    # anything else that left data there is compared by digests
    assert plan.for_blockrep(s, s[1], ME, held).mode == "rebase"
    assert plan.for_blockrep(s, s[1], ME, hello(held=[]), progress=prog).mode == "rebase"
    other = hello(held=[], transfer={"snapshot": s[0]["uuid"], "live": False})
    assert plan.for_blockrep(s, s[1], ME, other, progress=prog).mode == "rebase"
    assert plan.for_blockrep(s, s[1], ME, held, progress={**prog, "mode": "rebase"}).mode == "rebase"
    # a killed seed may have written beyond its confirmed prefix: digests decide
    assert plan.for_blockrep(s, s[1], ME, held, progress={**prog, "clean": False}).mode == "rebase"


def test_newest_common_uuid_is_the_base():
    s = snaps("a", "b", "c", "d")
    p = plan.for_blockrep(s, s[3], ME, hello(held=s[:2]))
    assert (p.mode, p.base["name"]) == ("incremental", "b")


def test_a_reused_name_with_a_new_uuid_is_not_a_base():
    s = snaps("a", "nightly", "new")
    old_nightly = {"name": "nightly", "uuid": str(uuid.uuid4())}  # the DR's is an older "nightly"
    p = plan.for_blockrep(s, s[2], ME, hello(held=[s[0], old_nightly]))
    assert p.base["name"] == "a"


def test_a_name_held_by_another_uuid_at_the_dr_is_refused():
    s = snaps("a", "nightly")
    with pytest.raises(plan.Conflict, match="different snapshot named nightly"):
        plan.for_blockrep(s, s[1], ME, hello(held=[s[0], {"name": "nightly", "uuid": str(uuid.uuid4())}]))


def test_snapshot_already_at_the_dr_is_done():
    s = snaps("a", "b")
    assert plan.for_blockrep(s, s[1], ME, hello(held=s)).mode == "done"


def test_the_source_itself_is_refused_even_with_force():
    s = snaps("a")
    with pytest.raises(plan.Conflict, match="itself"):
        plan.for_blockrep(s, s[0], ME, hello(volume=ME), force=True)


def test_a_dr_bound_to_another_primary_is_refused_unless_forced():
    s = snaps("a", "b")
    with pytest.raises(plan.Conflict, match="another primary"):
        plan.for_blockrep(s, s[1], ME, hello(held=s[:1], bound=OTHER))
    # forced: the other primary's snapshot is no base of ours (uuid from another volume): rebase
    p = plan.for_blockrep(s, s[1], ME, hello(held=[], bound=OTHER), force=True)
    assert p.mode == "rebase"


def test_an_unbound_volume_with_data_of_its_own_is_refused_unless_forced():
    s = snaps("a")
    with pytest.raises(plan.Conflict, match="data of its own"):
        plan.for_blockrep(s, s[0], ME, hello(bound=None, has_data=True))
    with pytest.raises(plan.Conflict, match="data of its own"):
        plan.for_blockrep(s, s[0], ME, hello(bound=None, has_data=False, held=[{"name": "x", "uuid": OTHER}]))
    assert plan.for_blockrep(s, s[0], ME, hello(bound=None, has_data=True), force=True).mode == "rebase"


def test_an_empty_unbound_volume_gets_the_seed():
    s = snaps("a")
    assert plan.for_blockrep(s, s[0], ME, hello(bound=None, has_data=False)).mode == "seed"


def test_bound_to_us_without_common_base_is_a_rebase():
    s = snaps("a", "b")
    assert plan.for_blockrep(s, s[1], ME, hello(held=[], has_data=True)).mode == "rebase"


def test_full_is_a_seed_even_with_a_base():
    s = snaps("a", "b")
    assert plan.for_blockrep(s, s[1], ME, hello(held=s[:1]), full=True).mode == "seed"


def test_a_live_transfer_at_the_dr_is_refused():
    s = snaps("a")
    with pytest.raises(plan.Conflict, match="another transfer"):
        plan.for_blockrep(s, s[0], ME, hello(transfer={"live": True, "name": "x", "started": "t"}))


# ------------------------------------------------------------------ plan for plain NBD targets

def test_plain_target_incremental_needs_uuid_head_and_fingerprint():
    s = snaps("a", "b")
    rec = {"snapshot_uuid": s[0]["uuid"], "head_uuid": s[0]["uuid"]}
    assert plan.for_plain(s, s[1], rec, True).mode == "incremental"
    assert plan.for_plain(s, s[1], rec, False).mode == "seed"  # fingerprint changed
    assert plan.for_plain(s, s[1], {**rec, "head_uuid": None}, True).mode == "seed"  # in between
    assert plan.for_plain(s, s[1], {"snapshot_uuid": str(uuid.uuid4())}, True).mode == "seed"  # base gone
    assert plan.for_plain(s, s[1], {}, True).mode == "seed"


def test_plain_target_holding_the_snapshot_is_done():
    s = snaps("a")
    rec = {"snapshot_uuid": s[0]["uuid"], "head_uuid": s[0]["uuid"]}
    assert plan.for_plain(s, s[0], rec, True).mode == "done"


# ------------------------------------------------------------------ resume

def test_resume_only_the_same_transfer_with_the_same_plan():
    ext = [(0, 4096), (8192, 4096)]
    prog = {"snapshot_uuid": "s", "base_uuid": "b", "mode": "incremental", "done_upto": 4096,
            "token": "t" * 32, "extents_sha256": plan.extents_digest(ext)}
    assert plan.resume_point(prog, "s", "b", "incremental", ext) == (4096, "t" * 32)
    assert plan.resume_point(prog, "s", "b", "incremental", ext[:1]) == (0, None)
    assert plan.resume_point(prog, "s", None, "incremental", ext) == (0, None)
    assert plan.resume_point(prog, "other", "b", "incremental", ext) == (0, None)
    assert plan.resume_point(None, "s", "b", "incremental", ext) == (0, None)


# ------------------------------------------------------------------ retention

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def targets(**bases):
    return {uri: {"snapshot_uuid": u, "replicated_at": at} for uri, (u, at) in bases.items()}


def test_base_and_unshipped_snapshots_are_protected():
    s = snaps("a", "b", "c", "d")
    why = retention.protected(s, targets(dr1=(s[1]["uuid"], "2026-11-30T00:00:00Z")), NOW)
    assert why == {"b": "the common base of dr1", "c": "not yet replicated to dr1", "d": "not yet replicated to dr1"}


def test_a_target_silent_for_30_days_protects_nothing():
    s = snaps("a", "b")
    assert retention.protected(s, targets(dr1=(s[0]["uuid"], "2026-10-01T00:00:00Z")), NOW) == {}


def test_user_snapshots_are_not_held_back_as_unshipped():
    s = snaps("a", "b") + snaps("mine", tagged=False)
    why = retention.protected(s, targets(dr1=(s[0]["uuid"], "2026-11-30T00:00:00Z")), NOW)
    assert "mine" not in why and why["b"].startswith("not yet")


def test_keep_local_prunes_only_tagged_snapshots_and_never_protected_ones():
    s = snaps("u1", tagged=False) + snaps("a", "b", "c", "d")
    safe = {"b": "the common base of dr1"}
    doomed, kept = retention.prune_plan(s, 1, safe, only_tagged=True)
    assert doomed == ["a", "c"] and kept == {"b": "the common base of dr1"}
    doomed, _ = retention.prune_plan(s, 1, {})
    assert doomed == ["u1", "a", "b", "c"]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 12), keep=st.integers(0, 12), base=st.integers(-1, 11),
       tags=st.lists(st.booleans(), min_size=12, max_size=12))
def test_prune_never_removes_a_protected_or_a_kept_snapshot(n, keep, base, tags):
    s = [snaps(f"s{i}", tagged=tags[i])[0] for i in range(n)]
    tg = targets(dr=(s[base]["uuid"], "2026-11-30T00:00:00Z")) if 0 <= base < n else {}
    safe = retention.protected(s, tg, NOW)
    for only in (False, True):
        doomed, kept = retention.prune_plan(s, keep, safe, only_tagged=only)
        assert not set(doomed) & set(safe)
        pool = [x["name"] for x in s if not only or x["flags"] & 1]
        assert not set(doomed) & set(pool[len(pool) - keep:] if keep else [])
        assert set(doomed) | set(kept) == set(pool[: max(0, len(pool) - keep)])


# ------------------------------------------------------------------ the DR protocol's grammar

TOKEN = "0123456789abcdef" * 2


def test_build_and_parse_round_trip():
    name = P.build("begin", primary=ME, snap=OTHER, name="n1", base=None, token=TOKEN, force=False)
    cmd = P.parse(name)
    assert cmd.verb == "begin" and cmd.args == {"primary": ME, "snap": OTHER, "name": "n1", "base": None,
                                                "token": TOKEN, "force": False}
    assert P.parse("!sums:16@").snapshot is None and P.parse("!sums:20@s1").shift == 20
    assert P.parse(f"!commit?token={TOKEN}&entries=3&shift=16&keep=none").args["keep"] is None


@pytest.mark.parametrize("name", [
    "!delete@snap", "!commit@snap", "!hello?x=1", "!sums@snap", "!sums:40@", "!sums:16@bad/name",
    f"!begin?primary={ME}&snap={OTHER}&name=n&base=none&token={TOKEN}",  # force missing
    f"!begin?primary={ME}&snap={OTHER}&name=n&base=none&token={TOKEN}&force=0&force=1",  # repeated
    f"!begin?primary={ME}&snap={OTHER}&name=n&base=none&token={TOKEN}&force=0&extra=1",
    f"!begin?primary=nope&snap={OTHER}&name=n&base=none&token={TOKEN}&force=0",
    "!data?token=short", f"!data?token={TOKEN.upper()}", f"!commit?token={TOKEN}&entries=-1&shift=16&keep=none",
    "!abort", "!" + "x" * 5000, "!changes@", "!hello\0",
    "!sums:30@", "!sums:12@", "!sums:\u0661\u0666@",  # 1 GiB digests (memory), 4 KiB, Arabic-Indic digits
    f"!commit?token={TOKEN}&entries=\u00b2&shift=16&keep=none",  # a superscript two is no digit here
])
def test_malformed_commands_are_refused(name):
    with pytest.raises(InvalidArgument):
        P.parse(name)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_parse_accepts_only_the_documented_grammar(text):
    try:
        cmd = P.parse("!" + text)
    except InvalidArgument:
        return
    assert cmd.verb in ("hello", "sums", "changes", "begin", "data", "manifest", "commit", "abort")


# ------------------------------------------------------------------ digest helpers

def test_chunk_runs_and_positions():
    assert C.chunks_of([(0, 1), (65536 * 3 - 1, 2)], 16) == [0, 2, 3]
    assert C.runs_of([0, 2, 3, 4, 9]) == [(0, 1), (2, 3), (9, 1)]
    import numpy as np
    runs = [(5, 2), (10, 3)]
    assert C.positions_to_chunks(runs, np.array([0, 1, 2, 4])) == [5, 6, 10, 12]
    assert C.coalesce([0, 1, 3], 20, 3 * (1 << 20) + 5) == [(0, 2 << 20), (3 << 20, 5)]


def test_manifest_decoding_refuses_disorder():
    good = P.encode_manifest([(1, b"a" * 16), (5, b"b" * 16)])
    assert P.decode_manifest(good, 6) == {1: b"a" * 16, 5: b"b" * 16}
    with pytest.raises(InvalidArgument):
        P.decode_manifest(P.encode_manifest([(5, b"a" * 16), (1, b"b" * 16)]), 6)
    with pytest.raises(InvalidArgument):
        P.decode_manifest(good, 5)
